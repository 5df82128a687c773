"""onnxruntime vs torch-eager scoring throughput of one bundle, in one run, at one thread count.

    .venv/bin/python benchmarks/bench_onnx.py --bundle /tmp/bottle_bundle --threads 1

Exports the bundle (or uses --export-dir), loads the same test images for both, and times the
full scoring path -- images -> maps + image scores -- of the torch bundle (`PNIDetector`, its
default exact top-k scorer) and of `pni_ray.export.runtime` alternately, repeat by repeat, so load from
other processes hits both alike; the median images/s of each and their ratio are printed, and
those of the export run one session per stage (`fuse=False`) against its default fused graph.

Then: a per-stage profile of both, the scorer-graph variants behind the export's choices
(chunking, coresets as constants or inputs, exact-threshold mask vs torch's arithmetic, ORT
optimisation level), parity figures on the images (--parity-all: the whole test split), and the
export directory size against the authors' layout (10 x 2048 MLP + dense position histogram).

--op-profile N: onnxruntime's own profile of the fused graph over N batches, summed per op type
and per node (milliseconds per batch): which kernels the deployment path spends its time in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("/tmp/bottle_bundle"))
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "mvtec_ad")
    p.add_argument("--category", default=None, help="default: the bundle's")
    p.add_argument("--export-dir", type=Path, default=None, help="existing export of the bundle (default: export now)")
    p.add_argument("--threads", type=int, default=1, help="torch threads = onnxruntime intra-op threads")
    p.add_argument("--images", type=int, default=8, help="test images timed per repeat")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", action="store_true", help="also time scorer-graph variants")
    p.add_argument("--parity-all", action="store_true", help="parity on every test image of the category")
    p.add_argument("--op-profile", type=int, default=0, metavar="N",
                   help="profile the fused graph's kernels over N batches (onnxruntime profiling)")
    p.add_argument("--backbone-runtime", choices=("onnxruntime", "openvino"), default="onnxruntime",
                   help="where the export's backbone runs (as `pni-ray score --backbone-runtime`); with openvino the "
                        "op profile covers the onnxruntime graph of the other stages")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    return p.parse_args()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def authors_layout_bytes(manifest: dict) -> dict[str, int]:
    """The same model stored the authors' way: a 10-layer, 2048-wide MLP on the concatenated
    (p^2 - 1) neighbour features, and the position histogram dense, positions x |C_emb| float32.
    The memory bank and the backbone are the same in both layouts and counted once each.
    """
    cfg = manifest["config"]["neighbourhood"]
    d, k, m = manifest["feature_dim"], manifest["dist_size"], manifest["n_memory"]
    h, w = manifest["grid"]
    width, layers = 2048, 10
    n_in = (cfg["window"] ** 2 - 1) * d
    params = (n_in * width + width) + (layers - 2) * (width * width + width) + (width * k + k)
    files = manifest["files"]
    backbone = files["backbone.onnx"]["bytes"]
    return {
        "mlp_10x2048": 4 * params,
        "dense_position_histogram": 4 * h * w * m,
        "memory_bank": 4 * m * d,
        "backbone_graph": backbone,
        "total": 4 * params + 4 * h * w * m + 4 * m * d + backbone,
    }


def kernel_ms_per_run(events: list[dict], warmup: int = 1) -> tuple[dict[str, float], dict[str, float]]:
    """onnxruntime profile events -> (ms per run by op type, ms per run by node), largest first.

    Runs are the profile's `model_run` events; a kernel event counts for the run whose time window
    holds it (a node inside a loop counts each time it runs). The first `warmup` runs (first-run
    allocations) are dropped and the rest averaged. Fence and session events are not kernel time."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    kept = runs[warmup:]
    if not kept:
        raise ValueError(f"the profile holds {len(runs)} run(s), fewer than warm-up {warmup} + 1")
    start = kept[0][0]
    by_node: dict[str, float] = {}
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start:
            continue
        node = e["name"][: -len("_kernel_time")]
        op_of[node] = e.get("args", {}).get("op_name", "?")
        by_node[node] = by_node.get(node, 0.0) + e["dur"] / 1000 / len(kept)
    by_op: dict[str, float] = {}
    for node, ms in by_node.items():
        by_op[op_of[node]] = by_op.get(op_of[node], 0.0) + ms
    order = lambda d: dict(sorted(d.items(), key=lambda kv: -kv[1]))  # noqa: E731
    return order(by_op), order(by_node)


def openvino_untiled(model) -> bool:
    """The backbone runs in OpenVINO on whole canvases, so its features are the fused graph's input."""
    return model.backbone_label != "onnxruntime" and not model.geometry.tiled


def refuse_unprofilable(model) -> None:
    """Exit naming why --op-profile cannot profile this export's fused graph (checked before any timing)."""
    if model.fused is None:
        raise SystemExit(f"--op-profile: {model.path} runs stage by stage (no fused graph: see the warning logged "
                         "when it loaded, or the export has a single stage)")
    apart = {"features"} if openvino_untiled(model) else set()  # made by the OpenVINO backbone
    missing = [i for i in model.fused[2] if i != "images" and i not in model.table_feeds and i not in apart]
    if missing:
        raise SystemExit(f"--op-profile: the fused graph of {model.path} also takes {', '.join(missing)} "
                         "(a tiled export, or one with filled cells): profile an untiled export")


def op_profile(model, x: np.ndarray, threads: int, runs: int) -> dict:
    """The fused graph in a profiling session: one warm-up batch, then `runs` batches."""
    import onnxruntime as ort

    from pni_ray.export.runtime import _session_options

    refuse_unprofilable(model)
    fused = model.fused_graph()
    with tempfile.TemporaryDirectory(prefix="pni-ray-prof-") as tmp:
        so = _session_options(threads, "all")
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(fused.SerializeToString(), so, providers=["CPUExecutionProvider"])
        made = {"images": x}
        if openvino_untiled(model):  # the backbone runs in OpenVINO: the graph starts at its features
            made["features"] = model.run_stage("backbone", {"images": x})["features"]
        feeds = {i.name: made.get(i.name, model.table_feeds.get(i.name)) for i in sess.get_inputs()}
        for _ in range(1 + runs):  # the first is a warm-up, dropped by kernel_ms_per_run
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op, by_node = kernel_ms_per_run(events, warmup=1)
    return {"runs": runs, "ms_per_batch_by_op": by_op, "ms_per_batch_by_node": by_node}


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> int:
    args = parse_args()
    if args.op_profile < 0:
        raise SystemExit(f"--op-profile {args.op_profile}: give a number of batches >= 1 (0: no profile)")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    from pni_ray.export import scorer_graph, tables
    from pni_ray.export.onnx_export import ExportOptions, export_bundle, parity_figures, torch_reference
    from pni_ray.export.runtime import _session_options, load_exported
    from pni_ray.data.mvtec import load_category
    from pni_ray.data.transforms import load_batch
    from pni_ray.inference import load_detector

    out: dict = {"threads": args.threads, "bundle": str(args.bundle)}
    detector, bmanifest = load_detector(args.bundle)
    category = args.category or bmanifest["category"]
    if not (args.data_root / category / "test").is_dir():  # said before minutes of export, not after
        print(f"skipping: {category} (its test/ images) not found under {args.data_root}")
        return 0
    size = detector.image_size
    tmp = None
    export_dir = args.export_dir
    if export_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="pni-ray-bench-")
        export_dir = Path(tmp.name) / "export"
        t0 = time.perf_counter()
        export_bundle(args.bundle, export_dir, ExportOptions())
        out["export_seconds"] = time.perf_counter() - t0
        print(f"exported {args.bundle} -> {export_dir} in {out['export_seconds']:.1f} s")

    t0 = time.perf_counter()
    model = load_exported(export_dir, threads=args.threads, backbone_runtime=args.backbone_runtime)
    out["ort_load_seconds"] = time.perf_counter() - t0
    out["backbone_runtime"] = model.backbone_label
    if args.op_profile:
        refuse_unprofilable(model)  # now, not after every timing
    manifest = model.manifest
    cat = load_category(args.data_root, category)
    samples = cat.test
    images = load_batch([s.path for s in samples[: args.images]], size).numpy()
    n = len(images)

    def run_torch() -> None:
        with torch.no_grad():
            for i in range(0, n, args.batch):
                detector(torch.from_numpy(images[i : i + args.batch]))

    staged = load_exported(export_dir, threads=args.threads, fuse=False,  # one session per stage
                           backbone_runtime=args.backbone_runtime)

    def run_ort(runtime=model) -> None:
        for i in range(0, n, args.batch):
            runtime.predict(images[i : i + args.batch])

    run_torch(), run_ort(), run_ort(staged)  # warm-up: allocator, lazy kernels
    t_torch, t_ort, t_staged = [], [], []
    for r in range(args.repeats):
        t_torch.append(timed(run_torch))
        t_ort.append(timed(run_ort))
        t_staged.append(timed(run_ort, staged))
        print(f"repeat {r + 1}: torch {n / t_torch[-1]:.2f} img/s   onnxruntime {n / t_ort[-1]:.2f} img/s   "
              f"(stage by stage {n / t_staged[-1]:.2f})")
    torch_ips, ort_ips, staged_ips = (n / statistics.median(t) for t in (t_torch, t_ort, t_staged))
    out.update(images=n, batch=args.batch, repeats=args.repeats, torch_images_per_s=torch_ips,
               ort_images_per_s=ort_ips, speedup=ort_ips / torch_ips, ort_staged_images_per_s=staged_ips,
               fused_speedup=ort_ips / staged_ips, fused=model.fused is not None)
    print(f"\nscoring throughput, {args.threads} thread(s), batch {args.batch}, {n} {category} images x {args.repeats}:")
    print(f"  torch eager  {torch_ips:8.2f} images/s")
    print(f"  onnxruntime  {ort_ips:8.2f} images/s")
    print(f"  ratio        {ort_ips / torch_ips:8.2f}x  (target >= 1.5x)")
    print(f"  onnxruntime, one session per stage {staged_ips:8.2f} images/s: the fused graph is {ort_ips / staged_ips:.2f}x")

    # ---- per-stage profile (one batch)
    x = images[: args.batch]
    xt = torch.from_numpy(x)
    prof: dict[str, dict[str, float]] = {"torch": {}, "onnxruntime": {}}
    with torch.no_grad():
        prof["torch"]["backbone"] = min(timed(detector.extractor, xt) for _ in range(2))
        feats = detector.extractor(xt)
        prof["torch"]["mlp"] = min(timed(detector.mlp.probabilities, feats) for _ in range(2))
        probs = detector.mlp.probabilities(feats)
        prof["torch"]["scorer+map"] = min(timed(lambda: detector.mapper(detector.scorer(feats, probs, detector.mode), (size, size))) for _ in range(2))
    f_np = model.run_stage("backbone", {"images": x})["features"]
    prof["onnxruntime"]["backbone"] = min(timed(model.run_stage, "backbone", {"images": x}) for _ in range(2))
    feeds = {"features": f_np, **model.table_feeds}
    if "mlp" in model.stages:  # torch's "mlp" = the MLP graph + the softmax graph
        logits = model.run_stage("mlp", {"features": f_np})["logits"]
        prof["onnxruntime"]["mlp"] = min(timed(model.run_stage, "mlp", {"features": f_np}) for _ in range(2)) + min(
            timed(model.run_stage, "softmax", {"logits": logits}) for _ in range(2))
        feeds["probabilities"] = model.run_stage("softmax", {"logits": logits})["probabilities"]
    prof["onnxruntime"]["scorer+map"] = min(timed(model.run_stage, "scorer", feeds) for _ in range(2))
    out["profile_seconds_per_batch"] = prof
    print(f"\nper stage, seconds per batch of {len(x)} (the export's backbone in {model.backbone_label}):")
    for stage in prof["torch"]:
        a, b = prof["torch"][stage], prof["onnxruntime"].get(stage, float("nan"))
        print(f"  {stage:<11} torch {a:7.3f}   onnxruntime {b:7.3f}   ({a / b:.2f}x)")

    if args.op_profile:
        prof_ops = op_profile(model, x, args.threads, args.op_profile)
        out["op_profile"] = prof_ops
        total = sum(prof_ops["ms_per_batch_by_op"].values())
        print(f"\nfused graph kernels, ms per batch of {len(x)} ({total:.1f} ms in all):")
        for op, ms in list(prof_ops["ms_per_batch_by_op"].items())[:12]:
            print(f"  {op:<24} {ms:8.1f}   {100 * ms / total:5.1f}%")
        print("  largest nodes:")
        for node, ms in list(prof_ops["ms_per_batch_by_node"].items())[:10]:
            print(f"    {node[:72]:<72} {ms:7.1f}")

    # ---- scorer-graph variants: what the export's choices buy
    if args.variants:
        st = tables.ScoringTables.read(export_dir)
        mode = manifest["mode"]
        masks = tables.mask_spec(mode, st, float(manifest["tau"]), tables.combine_rule(manifest),
                                 tables.neighbourhood_tau(manifest))
        h, w = manifest["grid"]
        base = dict(mode=mode, memory=st.memory, emb_to_dist=st.emb_to_dist, masks=masks, grid=(h, w),
                    image_size=(size, size), blur_sigma=float(manifest["config"]["scoring"]["blur_sigma"]),
                    n_dist=int(manifest["dist_size"]))
        prior_dense = np.zeros((h * w, st.memory.shape[0]), np.float32)
        if st.prior_prob is not None:
            prior_dense[st.prior_position, st.prior_entry] = st.prior_prob
        variants = {
            "export default: chunk 64, entry-major mask, [x,1] MatMul": dict(chunk=64),
            "chunk 16": dict(chunk=16),
            "chunk 256": dict(chunk=256),
            f"no chunking ({h * w} positions at once)": dict(chunk=h * w),
            "Gemm with bias input instead of [x,1] MatMul": dict(distance="gemm"),
            "coresets as graph inputs (fed from Arrow)": dict(coresets="input"),
            "naive: Gather last axis, GreaterOrEqual, Where(+inf)": dict(layout="naive", distance="gemm"),
            "naive + torch's arithmetic mask (Mul/Add/Mul/Greater)": dict(layout="naive", distance="gemm", mask="arithmetic",
                                                                       inv_cluster=st.inv_cluster, prior_dense=prior_dense,
                                                                       tau=float(manifest["tau"]),
                                                                       tau_n=tables.neighbourhood_tau(manifest)),
        }
        from pni_ray.export.runtime import scorer_table_feeds

        input_feeds = scorer_table_feeds(export_dir, {**manifest, "scorer": {"coresets": "input"}})
        vfeeds = {"features": f_np, **({"probabilities": feeds["probabilities"]} if "probabilities" in feeds else {})}
        results, sessions = {}, {}
        for name, kw in list(variants.items()) + [("ORT optimisation level 'basic' (default graph)", {"_level": "basic"}),
                                                  ("ORT optimisation disabled (default graph)", {"_level": "disable"})]:
            level = kw.pop("_level", "all")
            if kw.get("mask") == "arithmetic" and mode != "pni":
                continue
            model_proto = scorer_graph.build_scorer_graph(scorer_graph.ScorerSpec(**base, **kw), manifest["opset"])
            t0 = time.perf_counter()
            sess = ort.InferenceSession(model_proto.SerializeToString(), _session_options(args.threads, level),
                                        providers=["CPUExecutionProvider"])
            start = time.perf_counter() - t0
            f = dict(vfeeds)
            if kw.get("coresets") == "input":
                names = {i.name for i in sess.get_inputs()}
                f.update({k: v for k, v in input_feeds.items() if k in names})
            sess.run(None, f)
            sessions[name] = (sess, f)
            results[name] = {"session_start_seconds": start, "graph_bytes": model_proto.ByteSize(), "level": level,
                             "runs": []}
        for _ in range(args.repeats):  # round-robin, so drifting load from other processes hits all alike
            for name, (sess, f) in sessions.items():
                results[name]["runs"].append(timed(sess.run, None, f))
        default = next(iter(results))
        ref_maps = sessions[default][0].run(["maps"], sessions[default][1])[0]
        print(f"\nscorer graph variants, median seconds per batch of {len(x)} over {args.repeats} round-robin rounds "
              "(session start in brackets):")
        for name, r in results.items():
            r["seconds_per_batch"] = statistics.median(r["runs"])
            r["max_map_difference_to_default"] = float(np.abs(sessions[name][0].run(["maps"], sessions[name][1])[0] - ref_maps).max())
            print(f"  {name:<58} {r['seconds_per_batch']:7.3f} s   [{r['session_start_seconds']:5.2f} s]   "
                  f"graph {r['graph_bytes'] / 2**20:6.1f} MiB   max map diff {r['max_map_difference_to_default']:.1e}")
        del sessions
        out["scorer_variants"] = results

    # ---- parity
    par_samples = samples if args.parity_all else samples[: args.images]
    par_images = load_batch([s.path for s in par_samples], size).numpy() if args.parity_all else images
    ref = torch_reference(detector, par_images, batch=args.batch)
    got = model.predict(par_images)
    fig = parity_figures(*ref, *got)
    labels = np.array([s.label for s in par_samples])
    fig["decisions_identical"] = bool(np.array_equal(ref[1] > model.threshold, got[1] > model.threshold))
    if len(set(labels)) == 2:
        from pni_ray.metrics import image_auroc

        fig["image_auroc_torch"], fig["image_auroc_onnxruntime"] = image_auroc(labels, ref[1]), image_auroc(labels, got[1])
        said = f"image AUROC torch {fig['image_auroc_torch']:.4f} / onnxruntime {fig['image_auroc_onnxruntime']:.4f}"
    else:  # every image good or every one defective: no AUROC to compare
        said = "image AUROC n/a (these images are of one class: --parity-all scores the whole test split)"
    out["parity"] = fig
    print(f"\nparity on {fig['n_images']} {category} test images: max abs map error {fig['max_abs_error']:.3g}, "
          f"max rel {fig['max_rel_error']:.3g}, image-score abs {fig['max_abs_score_error']:.3g}, "
          f"ranking identical: {fig['ranking_identical']}, decisions identical: {fig['decisions_identical']}, {said}")

    # ---- sizes
    ours = dir_bytes(export_dir)
    theirs = authors_layout_bytes(manifest)
    out["sizes"] = {"export_dir_bytes": ours, "files": {k: v["bytes"] for k, v in manifest["files"].items()},
                    "authors_layout_bytes": theirs}
    print(f"\nexport directory: {ours / 2**20:.1f} MiB  " +
          ", ".join(f"{k} {v['bytes'] / 2**20:.2f}" for k, v in sorted(manifest["files"].items())))
    print(f"authors' layout:  {theirs['total'] / 2**20:.1f} MiB  (10 x 2048 MLP {theirs['mlp_10x2048'] / 2**20:.1f}, "
          f"dense position histogram {theirs['dense_position_histogram'] / 2**20:.1f}, memory bank "
          f"{theirs['memory_bank'] / 2**20:.1f}, backbone graph {theirs['backbone_graph'] / 2**20:.1f})  "
          f"= {theirs['total'] / ours:.1f}x ours")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
