"""Does another version of preprocess.py give exactly the same output? For changes meant to make preprocessing
faster and nothing else: every input is run through both versions (the baseline loaded from a file, e.g.
`git show HEAD:src/digitkit/preprocess.py > /tmp/old.py`) and compared on the verdict (`rejected`), the 28x28
tensor (bit for bit), `input_kind`, the candidate readings (names and tensors) and the whole record.

Inputs: 40 MNIST training digits drawn as every synth kind (v1 and issue-22 kinds; every 4th also encoded as PNG
or JPEG bytes, the server's path), 80 non-digits of every kind (every 3rd also as PNG), 40 phone photos at 320 px
as JPEG, the realworld benchmark's two timing inputs, and 20 plain MNIST digits as arrays and PNGs. Each runs with
the default PreprocessConfig; every 5th also with the adaptive threshold, deskew with a fixed polarity, and with
neither lighting removal nor a threshold. --seed picks other digits and draws.

    python benchmarks/preprocess_equivalence.py --baseline /tmp/old.py [--seed 0] [--out FILE.json]

Exit code 1 when any output differs (a record alone differing is reported, not counted: it may say more).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from digitkit import data, synth
from digitkit import preprocess as current

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess_speed import _module  # noqa: E402 - loads a baseline preprocess.py as a module
from realworld import ROOT, timing_inputs  # noqa: E402


def _encode(a: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def inputs(seed: int) -> list[tuple[str, object]]:
    ds = data.load_split(ROOT / "data" / "mnist", "train")
    part = slice(40 * seed, 40 * seed + 40)
    images, labels = ds.images[part, 0].numpy(), ds.labels[part].numpy()
    items: list[tuple[str, object]] = []
    for kind in [*synth.KINDS, *synth.EXTRA_KINDS]:
        for i, (img, _) in enumerate(synth.make_set(images, labels, kind, seed=seed)):
            items.append((f"{kind}/{i}/array", img))
            if i % 4 == 0:
                fmt = "PNG" if (img.ndim == 3 and img.shape[-1] == 4) or i % 8 == 0 else "JPEG"
                items.append((f"{kind}/{i}/{fmt}", _encode(img, fmt)))
    for i, (img, kind) in enumerate(synth.make_negatives(80, 5 + seed, digits=images, labels=labels)):
        items.append((f"negative-{kind}/{i}/array", img))
        if i % 3 == 0:
            items.append((f"negative-{kind}/{i}/PNG", _encode(img, "PNG")))
    for i in range(40):
        items.append((f"photo320/{i}/JPEG", _encode(synth.photo(images[i], i + 1000 * seed, long_side=320), "JPEG")))
    items.extend((f"timing/{name}", blob) for name, blob in timing_inputs("val", 200, 0).items())
    for i in range(20):
        items.append((f"mnist/{i}/array", images[i]))
        items.append((f"mnist/{i}/PNG", _encode(images[i], "PNG")))
    return items


def run(module, items: list[tuple[str, object]]) -> list[tuple]:
    configs = {"default": module.PreprocessConfig(), "adaptive": module.PreprocessConfig(threshold="adaptive"),
               "deskew_dark_on_light": module.PreprocessConfig(deskew=True, polarity="dark-on-light"),
               "no_lighting_no_threshold": module.PreprocessConfig(remove_lighting=False, threshold="none")}
    out = []
    for j, (name, src) in enumerate(items):
        for cname, cfg in configs.items():
            if cname != "default" and j % 5:
                continue
            try:
                r = module.preprocess(src, cfg)
                out.append((name, cname, r.rejected, r.tensor, r.record, list(r.candidates)))
            except Exception as e:  # noqa: BLE001 - an error must be the same error in both versions
                out.append((name, cname, f"{type(e).__name__}: {e}", None, None, None))
    return out


def differences(b: tuple, n: tuple) -> list[str]:
    found = []
    if b[2] != n[2]:
        found.append(f"rejected {b[2]!r} vs {n[2]!r}")
    if (b[3] is None) != (n[3] is None) or (b[3] is not None and not torch.equal(b[3], n[3])):
        found.append("tensor differs")
    if (b[4] or {}).get("input_kind") != (n[4] or {}).get("input_kind"):
        found.append("input_kind differs")
    bc, nc = b[5] or [], n[5] or []
    if [c for c, _ in bc] != [c for c, _ in nc]:
        found.append("candidates differ")
    elif any(not torch.equal(x, y) for (_, x), (_, y) in zip(bc, nc, strict=True)):
        found.append("candidate tensors differ")
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="the other preprocess.py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON file (default: benchmarks/results/preprocess-equivalence-s<seed>.json)")
    args = p.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    items = inputs(args.seed)
    base, new = run(_module(args.baseline), items), run(current, items)
    bad = [(b[0], b[1], d) for b, n in zip(base, new, strict=True) if (d := differences(b, n))]
    records = sum(json.dumps(b[4], sort_keys=True, default=str) != json.dumps(n[4], sort_keys=True, default=str)
                  for b, n in zip(base, new, strict=True))  # fmt: skip
    kinds = Counter((b[4] or {}).get("input_kind") for b in base)
    summary = {"seed": args.seed, "inputs": len(items), "runs": len(base), "differing_outputs": len(bad),
               "differing_records": records, "input_kinds": {str(k): v for k, v in kinds.items()},
               "rejected": sum(bool(b[2]) for b in base), "with_candidates": sum(bool(b[5]) for b in base),
               "differences": [{"input": n, "config": c, "what": d} for n, c, d in bad[:50]],
               "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    for n, c, d in bad[:30]:
        print(f"  differs: {n} [{c}]: {'; '.join(d)}")
    print(f"{len(base)} runs of {len(items)} inputs: {len(bad)} differing outputs, {records} differing records "
          f"(input kinds {dict(kinds)}, {summary['rejected']} rejected, {summary['with_candidates']} with candidates)")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"preprocess-equivalence-s{args.seed}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
