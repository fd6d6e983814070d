"""Benchmark the SAM-2 embedding cache: is a pseudo-label refresh from cached features much cheaper than re-encoding?

For each SAM image size: N synthetic slices (one nnU-Net-style preprocessed case) are encoded into the cache with
``build_sam2_cache``; then a refresh of K slices is timed two ways, both decoding P box prompts per slice in one
batched call:
  cached:    load_case_features (fp16 file -> fp32) + predict_from_features
  re-encode: to_sam_image + encode + predict_from_features
Reported: medians over repeats of encode time per slice, both refresh times and their ratio (goal >= 10x), decode
time per prompt, fp16 load time per slice and cache size per slice on disk.

Without --checkpoint the model is SAM-2.1 tiny with RANDOM weights built in-process (saved to a temporary file and
loaded through the same code path as a real checkpoint): only the times mean anything, never the masks.

    OMP_NUM_THREADS=1 python scripts/benchmark_sam2.py --sizes 1024 512 --out sam2_benchmark.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from nnunetv2_sss.sam.backend import SAM2Backend, to_sam_image, window_bounds
from nnunetv2_sss.sam.cache import build_sam2_cache, case_cache_file, load_case_features

RANDOM_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


def synthetic_case(z: int, size: int, seed: int = 0) -> np.ndarray:
    """(1, Z, size, size) float32 slices with smooth blobs and noise, zero mean / unit variance like nnU-Net data."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((1, z, size, size), np.float32)
    for k in range(z):
        for _ in range(4):
            cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(size / 20, size / 6)]
            out[0, k] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out[0, k] += 0.05 * rng.standard_normal((size, size))
    return (out - out.mean()) / out.std()


def write_case(folder: Path, identifier: str, data: np.ndarray) -> None:
    """Save like nnU-Net's preprocessor does (blosc2 + properties with class_locations)."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    folder.mkdir(parents=True, exist_ok=True)
    chunks = (1, 1, *data.shape[2:])
    props = {"class_locations": {1: np.zeros((0, 4), dtype=np.int64)}}
    nnUNetDatasetBlosc2.save_case(data, np.zeros((1, *data.shape[1:]), np.int8), props, str(folder / identifier),
                                  chunks=chunks, blocks=chunks)


def random_boxes(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    xy0 = rng.uniform(0, size * 0.6, (n, 2))
    wh = rng.uniform(size * 0.1, size * 0.4, (n, 2))
    return np.concatenate([xy0, np.minimum(xy0 + wh, size - 1)], axis=1).astype(np.float32)


def bench_size(image_size: int, checkpoint: Path, config: str | None, device: str, workdir: Path,
               args: argparse.Namespace) -> dict:
    backend = SAM2Backend(checkpoint, config, image_size=image_size, device=device)
    folder = workdir / f"bench{image_size}_unlabeled"
    data = synthetic_case(args.slices, args.slice_size)
    write_case(folder, "case0", data)
    hw = (args.slice_size, args.slice_size)
    rng = np.random.default_rng(1)
    boxes = [random_boxes(args.prompts, args.slice_size, rng) for _ in range(args.refresh_slices)]
    slices = [k % args.slices for k in range(args.refresh_slices)]
    bounds = window_bounds(data)

    backend.predict_from_features(backend.encode(to_sam_image(data[:, 0], bounds)), hw, boxes=boxes[0])  # warm-up

    t0 = time.perf_counter()
    cache = build_sam2_cache(folder, backend, "bench", "2d", progress=False)
    build_per_slice = (time.perf_counter() - t0) / args.slices
    cache_bytes = case_cache_file(cache, "case0").stat().st_size

    encode_t, reencode_refresh, cached_refresh, load_t, decode_t = [], [], [], [], []
    for _ in range(args.repeats):
        total = 0.0
        for z, b in zip(slices, boxes, strict=True):
            t0 = time.perf_counter()
            feats = backend.encode(to_sam_image(data[:, z], bounds))
            t1 = time.perf_counter()
            backend.predict_from_features(feats, hw, boxes=b)
            t2 = time.perf_counter()
            encode_t.append(t1 - t0)
            total += t2 - t0
        reencode_refresh.append(total)
        total = 0.0
        for z, b in zip(slices, boxes, strict=True):
            t0 = time.perf_counter()
            feats = load_case_features(cache, "case0", z, device=device)
            t1 = time.perf_counter()
            masks, _ = backend.predict_from_features(feats, hw, boxes=b)
            t2 = time.perf_counter()
            assert masks.shape == (args.prompts, *hw)
            load_t.append(t1 - t0)
            decode_t.append((t2 - t1) / args.prompts)
            total += t2 - t0
        cached_refresh.append(total)

    med = statistics.median
    return {
        "sam_image_size": image_size,
        "encode_s_per_slice": med(encode_t),
        "cache_build_s_per_slice": build_per_slice,
        "refresh_cached_s": med(cached_refresh),
        "refresh_reencode_s": med(reencode_refresh),
        "speedup": med(reencode_refresh) / med(cached_refresh),
        "decode_ms_per_prompt": 1000 * med(decode_t),
        "load_fp16_ms_per_slice": 1000 * med(load_t),
        "cache_mib_per_slice": cache_bytes / args.slices / 2**20,
    }


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    head = (f"| SAM size | encode / slice | cache build / slice | refresh {args.refresh_slices} slices, cached "
            f"| refresh, re-encode | speed-up | decode / prompt ({args.prompts} batched) | fp16 load / slice "
            f"| cache / slice |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['sam_image_size']} | {r['encode_s_per_slice']:.2f} s "
                     f"| {r['cache_build_s_per_slice']:.2f} s | {r['refresh_cached_s']:.3f} s "
                     f"| {r['refresh_reencode_s']:.2f} s | {r['speedup']:.1f}x "
                     f"| {r['decode_ms_per_prompt']:.1f} ms | {r['load_fp16_ms_per_slice']:.1f} ms "
                     f"| {r['cache_mib_per_slice']:.2f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 512], help="SAM image sizes (1024 512)")
    parser.add_argument("--slices", type=int, default=4, help="synthetic slices encoded into the cache (4)")
    parser.add_argument("--slice-size", type=int, default=256, help="synthetic slice size in pixels (256)")
    parser.add_argument("--refresh-slices", type=int, default=4, help="slices per timed refresh, K (4)")
    parser.add_argument("--prompts", type=int, default=3, help="box prompts per slice, P (3)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; medians are reported (3)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a real local SAM-2 checkpoint (default: random-weight SAM-2.1 tiny built in-process)")
    parser.add_argument("--config", default=None, help="SAM-2 config for --checkpoint (default: from its name)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sam2_bench_") as tmp:
        workdir = Path(tmp)
        if args.checkpoint is None:
            from sam2.build_sam import build_sam2

            os.environ["XDG_CACHE_HOME"] = str(workdir)  # keep the temporary checkpoint's hash out of ~/.cache

            torch.manual_seed(0)
            model = build_sam2(RANDOM_CONFIG, None, device="cpu")
            checkpoint = workdir / "sam2.1_hiera_tiny.pt"
            torch.save({"model": model.state_dict()}, checkpoint)
            del model
            weights = "RANDOM sam2.1 hiera tiny (times only are meaningful; masks are not)"
        else:
            checkpoint = args.checkpoint
            weights = str(checkpoint)
        rows = [bench_size(s, checkpoint, args.config, args.device, workdir, args) for s in args.sizes]

    meta = {
        "weights": weights, "device": args.device, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "sam2": version("sam2"), "cpu": platform.processor() or platform.machine(),
        "slices": args.slices, "slice_size": args.slice_size, "refresh_slices": args.refresh_slices,
        "prompts": args.prompts, "repeats": args.repeats,
    }
    print(f"\nSAM-2 cache benchmark. Weights: {weights}. Device {args.device}, {meta['torch_threads']} torch "
          f"thread(s); {args.slices} synthetic {args.slice_size}x{args.slice_size} slices; "
          f"refresh = {args.refresh_slices} slices x {args.prompts} box prompts; "
          f"medians over {args.repeats} repeats.\n")
    print(markdown(rows, args))
    if args.out is not None:
        args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
