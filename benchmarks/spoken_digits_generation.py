"""Time generating the spoken-digits set (eSpeak NG synthesis + log-mel) and measure its disk size.

Generates the recipe (default: ``SpokenDigitsConfig()``, i.e. ``data.spoken`` defaults) in a
fresh temporary cache, then prints clips, speakers, seconds (synthesis incl. rendering and WAV
writing, spectrograms incl. reading the WAVs back, total) and the size of the WAVs and of the
log-mel file. A second load is timed too (everything read from the cache).

    PYTHONPATH=src python benchmarks/spoken_digits_generation.py [--set rates=[160] --set snr_db=null]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ucmkd.config import SpokenDigitsConfig, from_dict, parse_overrides, to_dict
from ucmkd.data.spoken import load_spoken_digits, num_frames


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a data.spoken field (YAML value), e.g. --set 'voices=[en, en-us]'")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (spectrograms)")
    p.add_argument("--keep", action="store_true", help="keep the temporary cache and print its path")
    return p.parse_args(argv)


def tree_bytes(path: Path, pattern: str) -> tuple[int, int]:
    files = [f for f in path.rglob(pattern) if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = from_dict(SpokenDigitsConfig, {**to_dict(SpokenDigitsConfig()), **parse_overrides(args.set)},
                    "data.spoken")
    cache = Path(tempfile.mkdtemp(prefix="ucmkd-spoken-bench-"))
    try:
        t0 = time.perf_counter()
        d = load_spoken_digits(cfg, cache)
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        load_spoken_digits(cfg, cache)
        cached = time.perf_counter() - t1
        n_wav, wav_bytes = tree_bytes(d.root / "wav", "*.wav")
        spec_bytes = d.spec_path.stat().st_size
        n, speakers = len(d.y), len(set(d.speaker))
        synth, spec = d.seconds["synthesis"], d.seconds["spectrograms"]
        mb = 1024 ** 2
        grid = (f"{len(cfg.voices)} voices x {len(cfg.variants)} variants x {len(cfg.rates)} rates x "
                f"{len(cfg.pitches)} pitches x 10 digits")
        print(f"recipe: {grid}; snr_db={cfg.snr_db}, duration={cfg.duration} s, "
              f"log-mel [1, {cfg.n_mels}, {num_frames(cfg)}]; eSpeak NG {d.manifest['espeak_ng_version']}; "
              f"torch threads={args.threads}")
        rows = [
            ("clips", f"{n}"),
            ("speakers (voice+variant)", f"{speakers}"),
            ("synthesis + WAV writing (s)", f"{synth:.1f}  ({1000 * synth / n:.1f} ms/clip)"),
            ("log-mel spectrograms (s)", f"{spec:.1f}  ({1000 * spec / n:.2f} ms/clip)"),
            ("total generation (s)", f"{total:.1f}"),
            ("second load, from cache (s)", f"{cached:.2f}"),
            ("WAV files", f"{n_wav}, {wav_bytes / mb:.1f} MiB ({wav_bytes / n / 1024:.1f} KiB/clip)"),
            ("log-mel file", f"{spec_bytes / mb:.1f} MiB ({d.spec_path.name})"),
            ("cache total", f"{(wav_bytes + spec_bytes + (d.root / 'manifest.json').stat().st_size) / mb:.1f} MiB"),
        ]
        w = max(len(k) for k, _ in rows)
        print(f"| {'quantity':<{w}} | value")
        print(f"|{'-' * (w + 2)}|{'-' * 40}")
        for k, v in rows:
            print(f"| {k:<{w}} | {v}")
        if args.keep:
            print(f"cache kept at {cache}")
    finally:
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
