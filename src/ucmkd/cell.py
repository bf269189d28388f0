"""One grid cell trained data-parallel, the entry point ``ucmkd bench --nproc-per-cell N``
launches with PyTorch's launcher (:func:`ucmkd.grid.run_cells`)::

    python -m torch.distributed.run --standalone --nproc_per_node=N -m ucmkd.cell CELL.json RUN_DIR

CELL.json holds ``{"config": the cell's resolved run config, "plugins": [specs]}``; every rank
imports the plugins (:mod:`ucmkd.plugins`) and runs the grid's cell function
(:func:`ucmkd.grid._run_cell`), rank 0 writes ``RUN_DIR/result.json``. A ucmkd error is printed
as ``ucmkd: error: ...`` (the grid reports it) and exits with status 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import UcmkdError


def main(argv: list[str] | None = None) -> int:
    from .engine import distributed
    from .grid import _run_cell

    spec, run_dir = sys.argv[1:] if argv is None else argv
    try:
        cell = json.loads(Path(spec).read_text())
        _run_cell(cell["config"], run_dir, None, cell.get("plugins"))
    except UcmkdError as e:
        print(f"ucmkd: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
