"""One pinned training step per recipe and method against the independent reference.

    PYTHONPATH=src python benchmarks/recipe_fidelity.py

For each recipe (``ucmkd list``) and method, the first step (epoch 0) is run through ucmkd
(the recipe's config, optimiser, schedule and strategy) and through the plain-PyTorch
reference of the documented settings (tests/support/paper_reference.py: deepcopy, torch.optim,
torch.optim.lr_scheduler, POT), from the same weights and batch. Printed: the maximum over
parameter tensors of ||dW_ucmkd - dW_ref|| / ||dW_ref|| (dW: the step's change of the
weights) in float64 and float32 with fp32 arithmetic, and, where the recipe runs in bf16,
with both sides under bf16 autocast. ``tests/methods/test_recipes.py`` asserts the same quantities.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
import paper_reference as ref  # noqa: E402
from ucmkd.recipes import load_recipe, recipe_names  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    print("| recipe | method | float64 | float32 | bf16 (both sides autocast) |")
    print("|---|---|---|---|---|")
    for name in recipe_names():
        for method in load_recipe(name).methods:
            f64 = ref.pinned_step(name, method, torch.float64, "fp32")
            f32 = ref.pinned_step(name, method, torch.float32, "fp32")
            bf16 = (f"{ref.pinned_step(name, method, torch.float32, 'bf16'):.1e}"
                    if ref.documented(name, method).get("precision") == "bf16" else "-")
            print(f"| {name} | {method} | {f64:.1e} | {f32:.1e} | {bf16} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
