"""`pni-ray export`: ONNX graphs against torch, the torch-free runtime, op checks, TensorRT paths."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from pni_ray.export import opcheck, scorer_graph, tables, trt
from pni_ray.export.onnx_export import ExportOptions, export_bundle, parity_figures, save_graph, torch_reference
from pni_ray.export.runtime import load_exported
from pni_ray.data.mvtec import load_category
from pni_ray.data.transforms import load_batch
from pni_ray.bundle import model_id as bundle_model_id
from pni_ray.inference import load_detector
from trt_stand_in import install as stand_in_tensorrt

REPO = Path(__file__).resolve().parents[1]


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture(scope="module")
def images(synthetic_root) -> np.ndarray:
    cat = load_category(synthetic_root, "washer")
    return load_batch([s.path for s in cat.test], 128).numpy()  # 4 good + 6 defective


@pytest.fixture(scope="module")
def detector(bundle_tiny):
    return load_detector(bundle_tiny)[0]


@pytest.fixture(scope="module")
def reference(detector, images):
    return torch_reference(detector, images)


@pytest.fixture(scope="module")
def exported(bundle_tiny, tmp_path_factory) -> Path:
    """The tiny bundle exported from a copy that is changed on disk right after the export loaded it (its prior
    deleted, its manifest rewritten: `train --force` beside an export): what the export writes must be what it
    loaded, which test_export_directory_contents checks against the untouched bundle."""
    from pni_ray.export import onnx_export

    work = tmp_path_factory.mktemp("export")
    source = work / "bundle"
    shutil.copytree(bundle_tiny, source)
    load = onnx_export.load_source

    def load_then_change(path):
        loaded = load(path)
        (source / "position_prior.arrow").unlink()
        manifest = json.loads((source / "manifest.json").read_text())
        (source / "manifest.json").write_text(json.dumps({**manifest, "category": "replaced"}))
        return loaded

    out = work / "washer"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "load_source", load_then_change)
        export_bundle(source, out, ExportOptions(max_batch=4))
    return out


@pytest.fixture(scope="module")
def cli_trt(bundle_tiny, tmp_path_factory):
    """`pni-ray export --trt` here (no TensorRT, no GPU); coresets as inputs for coverage of that layout."""
    from pni_ray.cli import main

    out = tmp_path_factory.mktemp("cli") / "washer"
    result = CliRunner().invoke(main, ["export", str(bundle_tiny), "--out", str(out), "--trt", "--fp16",
                                       "--max-batch", "4", "--coresets", "input", "--threads", "1"])
    return result, out


# ---------------------------------------------------------------- parity per graph


def test_backbone_graph_matches_torch(exported, detector, images):
    (features,) = _session(exported / "backbone.onnx").run(None, {"images": images[:3]})
    with torch.no_grad():
        ref = detector.extractor(torch.from_numpy(images[:3])).numpy()
    assert features.shape == ref.shape
    assert _rel(features, ref) < 1e-5


def _probabilities(folder: Path, features: np.ndarray) -> np.ndarray:
    """mlp.onnx (logits / T) -> softmax.onnx (probabilities), as the runtime chains them."""
    (logits,) = _session(folder / "mlp.onnx").run(None, {"features": features})
    return _session(folder / "softmax.onnx").run(None, {"logits": logits})[0]


def test_mlp_graph_matches_torch(exported, detector, images):
    with torch.no_grad():
        features = detector.extractor(torch.from_numpy(images[:3]))
        ref = detector.mlp.probabilities(features).permute(0, 2, 3, 1).numpy()  # the graph is channels last
    probs = _probabilities(exported, features.numpy())
    assert probs.shape == ref.shape
    np.testing.assert_allclose(probs, ref, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # the temperature is folded into the classifier: mlp.onnx gives logits / T, the softmax graph divides nothing
    (logits,) = _session(exported / "mlp.onnx").run(None, {"features": features.numpy()})
    with torch.no_grad():
        ref_logits = (detector.mlp(features) / detector.mlp.temperature).permute(0, 2, 3, 1).numpy()
    assert detector.mlp.temperature != 1 and _rel(logits, ref_logits) < 1e-5
    assert [n.op_type for n in onnx.load(str(exported / "softmax.onnx")).graph.node] == ["Softmax"]


def test_scorer_graph_matches_torch_scorer_and_mapper(exported, detector, images):
    with torch.no_grad():
        features = detector.extractor(torch.from_numpy(images))
        probs = detector.mlp.probabilities(features)
        patch_topk = detector.scorer(features, probs, detector.mode)
        patch_dense = detector.scorer(features, probs, detector.mode, exact_dense=True)
        maps = detector.mapper(patch_topk, images.shape[-2:])
    patch, got_maps, scores = _session(exported / "scorer.onnx").run(
        None, {"features": features.numpy(), "probabilities": probs.permute(0, 2, 3, 1).numpy()})
    assert torch.equal(patch_topk, patch_dense)
    # identical inputs -> identical masks (exact thresholds); only distance rounding remains
    assert _rel(patch, patch_dense.numpy()) < 1e-5
    assert _rel(got_maps, maps.numpy()) < 1e-5
    np.testing.assert_allclose(scores, got_maps.reshape(len(got_maps), -1).max(1))


@pytest.mark.parametrize("combine", ["both", "mean"])
def test_scorer_graph_every_mode(detector, bundle_tiny, combine):
    """The op-level scorer against torch's exact dense path in all five scoring modes."""
    from pni_ray.export.onnx_export import scoring_tables

    g = torch.Generator().manual_seed(3)
    h, w = 16, 16
    features = torch.randn(2, detector.scorer.memory.shape[1], h, w, generator=g) * 0.5 + detector.scorer.memory.mean(0).view(1, -1, 1, 1)
    probs = torch.softmax(torch.randn(2, detector.mlp.n_classes, h, w, generator=g) * 3, dim=1)
    st = scoring_tables(detector)
    scorer = copy.copy(detector.scorer)
    scorer.combine = combine
    for mode in ("patchcore", "neighbourhood", "position", "pni", "pni_split"):
        spec = scorer_graph.ScorerSpec(mode=mode, memory=st.memory, emb_to_dist=st.emb_to_dist,
                                       masks=tables.mask_spec(mode, st, scorer.tau, combine), grid=(h, w),
                                       image_size=(128, 128), blur_sigma=2.0, n_dist=detector.mlp.n_classes, chunk=100)
        model = scorer_graph.build_scorer_graph(spec, opset=18)
        assert opcheck.check_model(model, name=mode).ok
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {"features": features.numpy()}
        if spec.needs_probs:
            feeds["probabilities"] = probs.permute(0, 2, 3, 1).numpy()
        patch = session.run(["patch_scores"], feeds)[0]
        with torch.no_grad():
            ref = scorer(features, probs, mode, exact_dense=True).numpy()
        assert _rel(patch, ref) < 1e-5, mode


def _random_scorer(combine: str, seed: int = 0, m: int = 300, k: int = 20, d: int = 8, h: int = 6, w: int = 5):
    """A torch scorer on random data built to hit every fallback, its tables, features and probabilities.

    Sparse prior with two positions that allow nothing and a flat one; patches whose probabilities are all zero
    (the neighbourhood refuses everything) or one-hot on a class (few entries, often none the
    position allows); patches sitting exactly on a memory entry (distance 0: exact recomputation).
    """
    from pni_ray.models.scorer import PatchScorer

    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(m, d, generator=g)
    e2d = torch.cat([torch.arange(k), torch.randint(0, k, (m - k,), generator=g)])
    prior = torch.rand(h * w, m, generator=g) ** 8
    prior = torch.where(prior >= prior.topk(40, dim=1).values[:, -1:], prior, torch.zeros(()))  # 40 entries a position
    prior[[0, 7]] = 0.0  # positions that allow nothing: the plain minimum
    prior[6] = (torch.arange(m) < 200).float()  # flat: tau < p(c|x) <= 2 tau, "mean" needs p(c|N) too
    prior = prior / prior.sum(1, keepdim=True).clamp_min(1e-30)
    scorer = PatchScorer(memory, e2d, prior, tau_scale=0.9, topk=4, combine=combine)
    near = torch.randint(0, m, (2 * h * w,), generator=g)
    rows = memory[near] + 0.3 * torch.randn(2 * h * w, d, generator=g)
    rows[::9] = memory[near[::9]]  # exactly on an entry
    features = rows.view(2, h, w, d).permute(0, 3, 1, 2).contiguous()
    probs = torch.softmax(3 * torch.randn(2, h, w, k, generator=g), dim=-1)
    probs[0, 1] = 0.0  # a grid row of patches the neighbourhood refuses entirely
    probs[1, 2] = torch.nn.functional.one_hot(torch.arange(w) % k, k).float()
    pos, ent = prior.nonzero(as_tuple=True)
    st = tables.ScoringTables(memory.numpy(), e2d.numpy().astype(np.int64), scorer.inv_cluster.numpy(), (h, w),
                              pos.numpy(), ent.numpy(), prior[pos, ent].numpy())
    return scorer, st, features, probs.permute(0, 3, 1, 2).contiguous()


VARIANTS = {"default": {}, "inputs": {"coresets": "input"}, "naive": {"layout": "naive", "distance": "gemm"}}


@pytest.mark.parametrize("combine,cut", [("both", 1.0), ("mean", 1.0), ("both", 6.0)])
def test_exported_scorer_equals_torch_on_random_data_with_every_fallback(combine, cut):
    """Every mode, both pni rules, each graph variant: the torch scorer's choices and exact distances,
    including patches with nothing allowed (pni: the position's entries, then all); with p(c|N) cut
    at tau and at a chosen multiple of it (the bundle's neighbourhood_cut)."""
    scorer, st, features, probs = _random_scorer(combine)
    scorer.tau_neighbourhood = cut * scorer.tau
    tau_n = scorer.tau_neighbourhood
    b, _, h, w = features.shape
    flat_probs = probs.permute(0, 2, 3, 1).reshape(b * h * w, -1)
    positions = torch.arange(h * w).repeat(b)
    pni = scorer.allowed(flat_probs, positions, None, "pni")
    by_position = scorer.position_mask_probs(positions, None) > scorer.tau
    assert (~pni.any(1) & by_position.any(1)).any()  # pni falls back to the position's entries
    assert (~pni.any(1) & ~by_position.any(1)).any()  # ... and to all of C_emb
    on_entry = torch.zeros(b * h * w, dtype=torch.bool)
    on_entry[::9] = True
    feeds_all = {"features": features.numpy(), "probabilities": probs.permute(0, 2, 3, 1).numpy()}
    for mode in ("patchcore", "neighbourhood", "position", "pni", "pni_split"):
        with torch.no_grad():
            ref = scorer(features, probs, mode, exact_dense=True).numpy()
            assert np.array_equal(scorer(features, probs, mode).numpy(), ref), mode
            if cut != 1.0 and mode in ("neighbourhood", "pni", "pni_split"):  # the cut decides scores here
                at_tau = copy.copy(scorer)
                at_tau.tau_neighbourhood = scorer.tau
                assert not np.array_equal(at_tau(features, probs, mode, exact_dense=True).numpy(), ref), mode
        if mode == "patchcore":
            assert (ref.reshape(-1)[on_entry.numpy()] == 0).all()  # exact: no GEMM cancellation left
        masks = tables.mask_spec(mode, st, scorer.tau, combine, tau_n)
        variants = dict(VARIANTS)
        if mode == "pni":
            prior_dense = scorer.position_prior.numpy()
            variants["arithmetic"] = dict(layout="naive", distance="gemm", mask="arithmetic", tau=scorer.tau,
                                          tau_n=tau_n, inv_cluster=st.inv_cluster, prior_dense=prior_dense)
        for name, kw in variants.items():
            spec = scorer_graph.ScorerSpec(mode=mode, memory=st.memory, emb_to_dist=st.emb_to_dist, masks=masks,
                                           grid=(h, w), image_size=(48, 40), blur_sigma=1.0, n_dist=probs.shape[1],
                                           chunk=7, **kw)
            model = scorer_graph.build_scorer_graph(spec)
            assert opcheck.check_model(model, name=mode).ok
            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            names = {i.name for i in session.get_inputs()}
            feeds = {k: v for k, v in feeds_all.items() if k in names}
            if spec.coresets == "input":
                feeds.update(tables.scorer_table_values(mode, st, scorer.tau, combine, tau_n))
            patch = session.run(["patch_scores"], feeds)[0]
            assert np.abs(patch - ref).max() < 1e-5, (mode, name, np.abs(patch - ref).max())


def _allowed(probs: np.ndarray, st: tables.ScoringTables, tau: float, mode: str = "pni",
             combine: str = "both") -> np.ndarray:
    """(B, hw, M) mask of the exported scorer: G >= T with the exact float32 thresholds."""
    t = tables.mask_spec(mode, st, tau, combine).dense_threshold()  # (hw, M) or (1, M)
    g = probs.reshape(len(probs), -1, probs.shape[-1])[:, :, st.emb_to_dist]  # (B, hw, M)
    return g >= t[None]


MASK_RULES = (("pni", "both"), ("pni", "mean"), ("neighbourhood", "both"))


def test_fp16_build_keeps_the_mlp_mask_exact(exported, detector, bundle_tiny, images):
    """An FP16 TensorRT build runs mlp.onnx in FP16 (its logits / T leave the engine FP16-rounded, as FP32
    tensors) and softmax.onnx + scorer.onnx in FP32: the allowed sets are then exactly those of
    torch's FP32 rule on the same logits, for either pni rule. An FP16 softmax (the MLP graph's old
    layout) flips entries."""
    from pni_ray.export.onnx_export import scoring_tables

    with torch.no_grad():
        features = detector.extractor(torch.from_numpy(images[:4])).numpy()
    (logits,) = _session(exported / "mlp.onnx").run(None, {"features": features})
    logits16 = logits.astype(np.float16).astype(np.float32)  # where TensorRT casts: the FP16 engine's output
    probs = _session(exported / "softmax.onnx").run(None, {"logits": logits16})[0]
    st = scoring_tables(detector)
    tau = float(detector.scorer.tau)
    with torch.no_grad():
        ref_probs = torch.softmax(torch.from_numpy(logits16), dim=-1).numpy()  # mlp.onnx's logits are already / T
    x16 = logits16.astype(np.float16)
    e16 = np.exp(x16 - x16.max(-1, keepdims=True))
    probs16 = (e16 / e16.sum(-1, keepdims=True, dtype=np.float16)).astype(np.float32)  # an FP16 softmax
    hw, m = st.grid[0] * st.grid[1], st.memory.shape[0]
    p_x = np.zeros((hw, m), np.float32)
    p_x[st.prior_position, st.prior_entry] = st.prior_prob
    g_ref = ref_probs.reshape(len(ref_probs), hw, -1)[:, :, st.emb_to_dist]
    flipped = []
    for mode, combine in MASK_RULES:  # torch's own float32 expression on the same logits
        torch_allowed = tables.predicate(mode, g_ref, st.inv_cluster[None, None], p_x[None], tau, combine)
        fp32 = _allowed(probs, st, tau, mode, combine)
        assert np.array_equal(fp32, torch_allowed), (mode, combine)
        assert 0 < fp32.mean() < 1
        flipped.append(not np.array_equal(_allowed(probs16, st, tau, mode, combine), torch_allowed))
    assert any(flipped)  # the test can fail: an FP16 softmax flips entries
    # the scorer graph with those probabilities gives torch's patch scores (same masks, FP32 distances)
    patch = _session(exported / "scorer.onnx").run(["patch_scores"], {"features": features, "probabilities": probs})[0]
    with torch.no_grad():
        ref_patch = detector.scorer(torch.from_numpy(features), torch.from_numpy(ref_probs).permute(0, 3, 1, 2),
                                    "pni", exact_dense=True).numpy()
    assert _rel(patch, ref_patch) < 1e-5


def test_exact_thresholds_reproduce_the_torch_mask_bit_for_bit():
    rng = np.random.default_rng(0)
    n = 20000
    inv = (1.0 / rng.integers(1, 40, n)).astype(np.float32)
    p_x = np.where(rng.random(n) < 0.5, 0.0, rng.random(n) ** 6).astype(np.float32)
    tau = 0.5 / 16384
    for mode, combine in MASK_RULES:
        t = tables.exact_thresholds(mode, inv, p_x, tau, combine)
        finite = np.isfinite(t)
        assert finite.any()
        if combine == "mean":  # p(c|x) alone passes: always allowed
            assert (t[p_x > 2 * tau] == -np.inf).any()
        if mode == "pni" and combine == "both":  # never without both; never where the position refuses
            assert not (t == -np.inf).any() and (t[p_x <= np.float32(tau)] == np.inf).all()
        below = np.nextafter(t[finite], np.float32(0))
        assert not tables.predicate(mode, below, inv[finite], p_x[finite], tau, combine).any()
        assert tables.predicate(mode, t[finite], inv[finite], p_x[finite], tau, combine).all()
        for g in (rng.random(n).astype(np.float32) * np.float32(0.05), rng.random(n).astype(np.float32)):
            assert np.array_equal(g >= t, tables.predicate(mode, g, inv, p_x, tau, combine))
    # and against torch's own expressions
    g = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 0.01
    p_n, px = g * torch.from_numpy(inv), torch.from_numpy(p_x)
    for combine, torch_mask in (("mean", (p_n + px) * 0.5 > tau), ("both", (p_n > tau) & (px > tau))):
        assert np.array_equal(torch_mask.numpy(), g.numpy() >= tables.exact_thresholds("pni", inv, p_x, tau, combine))


def test_both_rule_thresholds_carry_the_position_mask():
    """combine "both": T[x, m] < +inf exactly where the position allows m (pni's first fallback)."""
    _, st, _, _ = _random_scorer("both")
    masks = tables.mask_spec("pni", st, 0.9 / st.memory.shape[0], "both")
    finite = np.isfinite(masks.dense_threshold())
    dense = masks.dense_position_mask()
    empty = masks.position_rows_empty()
    assert empty.sum() == 2 and dense[empty].all()  # positions that allow nothing allow everything
    assert np.array_equal(finite[~empty], dense[~empty]) and not finite[empty].any()
    assert (masks.threshold_base == np.inf).all()


@pytest.mark.parametrize("grid,size,sigma", [((16, 16), (128, 128), 2.0), ((13, 9), (100, 70), 4.0), ((8, 8), (64, 64), 0.0)])
def test_map_matrices_equal_the_torch_mapper(grid, size, sigma):
    from pni_ray.models.anomaly_map import AnomalyMapper

    s = torch.rand(3, *grid, generator=torch.Generator().manual_seed(0))
    ref = AnomalyMapper(sigma)(s, size).numpy()
    ly, lxt = scorer_graph.map_matrices(grid, size, sigma)
    got = ly @ s.numpy() @ lxt
    assert got.shape == ref.shape and _rel(got, ref) < 1e-5


# ---------------------------------------------------------------- end to end, runtime


def test_runtime_matches_torch_bundle(exported, reference, images, bundle_tiny):
    model = load_exported(exported, threads=1)
    maps, scores = model.predict(images)
    fig = parity_figures(*reference, maps, scores)
    assert maps.shape == (len(images), 128, 128) and maps.dtype == np.float32
    assert fig["max_rel_error"] <= 1e-3, fig
    assert fig["ranking_identical"], fig
    assert model.image_size == (128, 128)
    assert model.threshold == json.loads((exported / "manifest.json").read_text())["threshold"]
    # the bundle it loaded (the fixture changed its copy on disk after the load)
    assert model.source_model_id == bundle_model_id(bundle_tiny)
    assert model.model_id == tables.export_id(exported) != model.source_model_id  # the export's own identity
    assert np.array_equal(scores > model.threshold, reference[1] > model.threshold)
    # batches above max_batch are split; results do not depend on the batch size
    one = np.concatenate([model.predict(images[i : i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(one, maps[:3], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="images must be"):
        model.predict(images[:, :, :64])


def test_fused_chain_equals_the_stages_one_by_one(exported, images):
    """One fused session (pni_ray.export.fused) gives what the four stage sessions give."""
    fused, staged = load_exported(exported, threads=1), load_exported(exported, threads=1, fuse=False)
    assert fused.fused is not None and fused.fused[0] == fused.stages == ("backbone", "mlp", "softmax", "scorer")
    assert staged.fused is None
    (m1, s1), (m2, s2) = fused.predict(images), staged.predict(images)
    assert _rel(m1, m2) <= 1e-6 and _rel(s1, s2) <= 1e-6
    assert np.array_equal(np.argsort(s1, kind="stable"), np.argsort(s2, kind="stable"))
    # the stage sessions stay usable one by one (profiling), made on first use
    features = fused.run_stage("backbone", {"images": images[:2]})["features"]
    assert features.shape[0] == 2 and fused.stage_inputs("scorer")[:2] == ("features", "probabilities")
    # the graph the fused session runs, rebuilt for profiling: same inputs, one output, no graph when unfused
    graph = fused.fused_graph()
    assert tuple(i.name for i in graph.graph.input) == fused.fused[2] and staged.fused_graph() is None
    assert [o.name for o in graph.graph.output] == [fused.chain_output(fused.fused[0])]


def test_openvino_backbone_runs_apart_and_matches_onnxruntime(exported, reference, images):
    """--backbone-runtime openvino: the backbone graph in OpenVINO, the other stages still one fused
    onnxruntime graph; in f32 the maps are onnxruntime's to float rounding, in bf16 to its precision."""
    pytest.importorskip("openvino")
    base = load_exported(exported, threads=1)
    f32 = load_exported(exported, threads=1, backbone_runtime="openvino", backbone_precision="f32")
    assert base.chained_stages() == ("backbone", "mlp", "softmax", "scorer")
    assert f32.chained_stages() == ("mlp", "softmax", "scorer") and f32.fused[0] == f32.chained_stages()
    assert "backbone" not in f32._sessions and f32._openvino.precision == "f32"
    calls = []
    run = f32._openvino.run
    f32._openvino.run = lambda feeds: calls.append(len(feeds["images"])) or run(feeds)
    maps, scores = f32.predict(images)
    assert calls == [4, 4, 2]  # max_batch 4: every batch's backbone ran in OpenVINO
    ref_features = base.run_stage("backbone", {"images": images[:4]})["features"]
    np.testing.assert_allclose(f32.run_stage("backbone", {"images": images[:4]})["features"], ref_features,
                               rtol=1e-4, atol=1e-4)
    fig = parity_figures(*reference, maps, scores)
    assert fig["max_rel_error"] <= 1e-3 and fig["ranking_identical"], fig
    assert f32.backbone_label == "openvino-f32" and base.backbone_label == "onnxruntime"
    apart = load_exported(exported, threads=1, backbone_runtime="openvino", backbone_precision="f32", fuse=False)
    assert apart.fused is None and "backbone" not in apart._sessions  # stage by stage: the backbone still in OpenVINO
    np.testing.assert_allclose(apart.predict(images)[0], maps, rtol=1e-5, atol=1e-5)
    bf16 = load_exported(exported, threads=1, backbone_runtime="openvino", backbone_precision="bf16")
    assert bf16._openvino.precision in ("bf16", "f32")  # f32 where the CPU has no bf16 arithmetic
    fig = parity_figures(*reference, *bf16.predict(images))
    # bf16 keeps 8 bits of mantissa: the tiny model's maps move by up to ~30% of their range where a
    # distance crosses a mask's cut; the images' order stays. Real data: bench_peers (accuracy measured)
    assert fig["ranking_identical"], fig


def test_evaluate_an_export_directory_as_score_runs_it(exported, bundle_tiny, synthetic_root, tmp_path):
    """`pni-ray evaluate EXPORT DATA`: the export's own maps (onnxruntime, or its backbone in OpenVINO) give
    the bundle's metrics to float rounding; modes and runtimes that do not apply are refused."""
    from pni_ray.cli import main

    runner = CliRunner()
    figures = {}
    runs = {"bundle": [str(bundle_tiny)], "export": [str(exported)]}
    if importlib.util.find_spec("openvino") is not None:
        runs["openvino"] = [str(exported), "--backbone-runtime", "openvino", "--backbone-precision", "f32"]
    for name, args in runs.items():
        result = runner.invoke(main, ["evaluate", args[0], str(synthetic_root), *args[1:], "--threads", "1",
                                      "--json", str(tmp_path / f"{name}.json")])
        assert result.exit_code == 0, result.output
        figures[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert figures["export"]["mode"] == figures["bundle"]["mode"] == "pni" and figures["export"]["n_test_images"] == 10
    assert figures["export"]["backbone_runtime"] == "onnxruntime"
    for name in runs:
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            assert abs(figures[name][key] - figures["bundle"][key]) <= 2e-3, (name, key, figures)
    if "openvino" in figures:
        assert figures["openvino"]["backbone_runtime"] == "openvino-f32"
    for args, phrase in (([str(exported), "--ablation"], "--mode and --ablation apply to bundles"),
                         ([str(bundle_tiny), "--backbone-runtime", "openvino"], "apply to export directories"),
                         ([str(tmp_path)], "no manifest.json")):
        result = runner.invoke(main, ["evaluate", args[0], str(synthetic_root), *args[1:]])
        assert result.exit_code != 0 and phrase in result.output, (args, result.output)


OPENVINO_MODELS = {  # what builds an OpenVINO model of a graph file (name `graph`), with a line that runs it on x
    "pni-ray backbone": ("from pni_ray.export.openvino_backbone import OpenVINOBackbone",
                         'OpenVINOBackbone(graph, threads=1, precision="f32")', '.run({"images": x})'),
    "bench_peers' anomalib side": ("import sys; sys.path.insert(0, 'benchmarks'); from bench_peers import anomalib_openvino",
                                   'anomalib_openvino(graph, {"threads": 1}, 1, None)', '.create_infer_request().infer({0: x})'),
}


@pytest.mark.parametrize("maker", sorted(OPENVINO_MODELS))
def test_openvino_models_leave_signals_safe(exported, maker):
    """Two OpenVINO models dropped in the order they came, then a signal Python handles (Ctrl-C,
    a scheduler's SIGTERM): with a Core per model, OpenVINO 2026.4 left the main thread's alternate
    signal stack on freed memory and the signal crashed the process. One Core per process (shared_core),
    for the backbones pni-ray runs and the peer's graphs bench_peers times, keeps it alive; run in a
    child process, since the failure is a segmentation fault."""
    pytest.importorskip("openvino")
    imports, build, use = OPENVINO_MODELS[maker]
    script = f"""
import gc, os, signal, time
import numpy as np
{imports}
graph = {str(exported / 'backbone.onnx')!r}
x = np.zeros((1, 3, 128, 128), np.float32)
a = {build}; a{use}
b = {build}; b{use}
del a; gc.collect()
del b; gc.collect()
def stop(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, stop)
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
except KeyboardInterrupt:
    print("stopped cleanly")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and "stopped cleanly" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_openvino_backbone_refuses_clearly(exported, monkeypatch):
    from pni_ray.export.openvino_backbone import OpenVINOUnavailable

    with pytest.raises(ValueError, match="backbone runtime must be one of"):
        load_exported(exported, backbone_runtime="tensorrt")
    with pytest.raises(ValueError, match="precision must be one of"):
        load_exported(exported, backbone_runtime="openvino", backbone_precision="fp8")
    with pytest.raises(ValueError, match="applies to the openvino backbone runtime only"):
        load_exported(exported, backbone_precision="bf16")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(OpenVINOUnavailable, match=r"pip install 'pni-ray\[openvino\]'"):
        load_exported(exported, backbone_runtime="openvino")


def test_unfusable_or_refused_graphs_run_stage_by_stage(exported, images, monkeypatch, caplog):
    import pni_ray.export.fused as fused_mod

    expected = load_exported(exported, threads=1).predict(images[:3])[0]

    def refuse(*_):
        raise fused_mod.FusionError("a test says no")

    def broken(stages, outputs):  # a graph onnxruntime refuses: an output nothing produces
        graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("maps", TensorProto.FLOAT, [1])])
        return helper.make_model(graph)

    for fake, said in ((refuse, "a test says no"), (broken, "onnxruntime refused the fused graph")):
        monkeypatch.setattr(fused_mod, "fuse_stages", fake)
        with caplog.at_level("WARNING", logger="pni_ray.export.runtime"):
            model = load_exported(exported, threads=1)
        assert model.fused is None and said in caplog.text
        np.testing.assert_allclose(model.predict(images[:3])[0], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"needs \['probabilities'\]"):
        model.run_stages(("scorer",), {"features": np.zeros((1, 1, 1, 1), np.float32)})


def _stage(name: str, nodes, inputs, outputs, inits=(), opset: int = 17) -> tuple[str, onnx.ModelProto]:
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2])  # noqa: E731
    graph = helper.make_graph(nodes, name, [vi(i) for i in inputs], [vi(o) for o in outputs], list(inits))
    return name, helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_fuse_stages_wires_by_name_and_keeps_stages_apart():
    from pni_ray.export.fused import fuse_stages

    one = np.ones(2, np.float32)
    a = _stage("a", [helper.make_node("Add", ["x", "c"], ["y"], name="n")], ["x"], ["y"],
               [onnx.numpy_helper.from_array(one, "c")])
    # b reads a's y and the shared input x, and has its own constant and node named like a's
    b = _stage("b", [helper.make_node("Mul", ["y", "x"], ["t"], name="n"), helper.make_node("Add", ["t", "c"], ["z"], name="m")],
               ["y", "x"], ["z"], [onnx.numpy_helper.from_array(3 * one, "c")])
    # c reads z and a second graph input
    c = _stage("c", [helper.make_node("Sub", ["z", "w"], ["y"], name="n")], ["z", "w"], ["y"])
    fused = fuse_stages([a, b, c], ["y", "z"])
    onnx.checker.check_model(fused)
    assert [i.name for i in fused.graph.input] == ["x", "w"] and [o.name for o in fused.graph.output] == ["y", "z"]
    x, w = np.array([1, 2], np.float32), np.array([10, 20], np.float32)
    y, z = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x, "w": w})
    np.testing.assert_array_equal(z, (x + 1) * x + 3)
    np.testing.assert_array_equal(y, z - w)  # the latest stage's y, not a's


def test_fuse_stages_refuses_what_it_cannot_rename():
    from pni_ray.export.fused import FusionError, fuse_stages

    a = _stage("a", [helper.make_node("Relu", ["x"], ["y"])], ["x"], ["y"])
    with pytest.raises(FusionError, match="opset 13, an earlier stage 17"):
        fuse_stages([a, _stage("b", [helper.make_node("Relu", ["y"], ["z"])], ["y"], ["z"], opset=13)], ["z"])
    branch = helper.make_graph([helper.make_node("Identity", ["y"], ["o"])], "g", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])])
    cond = helper.make_node("If", ["flag"], ["z"], then_branch=branch, else_branch=branch, name="if")
    b = _stage("b", [cond], ["y"], ["z"])
    b[1].graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    with pytest.raises(FusionError, match="subgraph"):
        fuse_stages([a, b], ["z"])
    with pytest.raises(FusionError, match="no stage produces"):
        fuse_stages([a], ["q"])
    with pytest.raises(FusionError, match="named twice"):
        fuse_stages([a], ["y", "y"])
    with pytest.raises(FusionError, match="also inputs"):  # a pass-through output would loop onto itself
        fuse_stages([a, _stage("b", [], ["x"], ["x"])], ["x"])
    ints = _stage("b", [helper.make_node("Relu", ["y"], ["z"])], ["y"], ["z"])
    ints[1].graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    with pytest.raises(FusionError, match="reads 'y' as"):
        fuse_stages([a, ints], ["z"])
    external = _stage("b", [helper.make_node("Add", ["y", "w"], ["z"])], ["y"], ["z"],
                      [onnx.numpy_helper.from_array(np.ones(2, np.float32), "w")])
    external[1].graph.initializer[0].data_location = onnx.TensorProto.EXTERNAL
    with pytest.raises(FusionError, match="external data"):
        fuse_stages([a, external], ["z"])


def test_stage_pipeline_wires_stages_by_name():
    """The stage-by-stage chain TensorRT runs: inputs from the feeds or earlier outputs, held tables never fed."""
    from pni_ray.export.runtime import StagePipeline

    class Fake(StagePipeline):
        inputs = {"backbone": ("images",), "scorer": ("features", "images")}  # a table input is left out, as TRT does

        def stage_inputs(self, name):
            return self.inputs[name]

        def run_stage(self, name, feeds):
            assert set(feeds) == set(self.inputs[name])
            if name == "backbone":
                return {"features": feeds["images"] * 2}
            return {"maps": feeds["features"] + feeds["images"], "scores": feeds["images"].max(keepdims=True)}

    out = Fake().run_stages(("backbone", "scorer"), {"images": np.ones(3, np.float32), "fill_index": np.zeros(1)})
    np.testing.assert_array_equal(out["maps"], [3, 3, 3])
    with pytest.raises(ValueError, match=r"stage scorer needs \['images'\]"):
        Fake().run_stages(("scorer",), {"features": np.ones(3, np.float32)})


def test_fuse_stages_keeps_unnamed_nodes_unnamed():
    from pni_ray.export.fused import fuse_stages

    a = _stage("a", [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["y"], ["z"])], ["x"], ["z"])
    fused = fuse_stages([a], ["z"])
    assert [n.name for n in fused.graph.node] == ["", "", "output/z"]
    x = np.array([-1, 2], np.float32)
    out = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, [0, -2])


def test_runtime_imports_no_torch(exported, images, tmp_path):
    np.save(tmp_path / "images.npy", images[:2])
    code = f"""
import sys, numpy as np
from pni_ray.export.runtime import load_exported
m = load_exported({str(exported)!r}, threads=1)
maps, scores = m.predict(np.load({str(tmp_path / 'images.npy')!r}))
np.save({str(tmp_path / 'maps.npy')!r}, maps)
assert "torch" not in sys.modules, "the runtime imported torch"
print("OK", sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "timm", "pni_ray") and not k.startswith("pni_ray.export")))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # only torch-free pni_ray modules come along (file helpers, and the geometry evaluate uses); no torch, no timm
    assert proc.stdout.strip() == ("OK ['pni_ray', 'pni_ray.config', 'pni_ray.data', 'pni_ray.data.images', "
                                   "'pni_ray.fileio', 'pni_ray.geometry']")
    ref = load_exported(exported, threads=1).predict(images[:2])[0]
    np.testing.assert_array_equal(np.load(tmp_path / "maps.npy"), ref)


def test_predict_takes_model_inputs_and_names_predict_images_for_photos(exported, images):
    """`predict` takes prepared float32 canvases; decoded photos (uint8, any size) go through predict_images, which
    gives what predict gives for the same canvas."""
    model = load_exported(exported, threads=1)
    photo = (images[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)
    with pytest.raises(TypeError, match="for decoded photos .* use predict_images"):
        model.predict(photo[None].transpose(0, 3, 1, 2))
    maps, scores = model.predict_images([photo])
    _, canvas_scores = model.predict(photo[None].transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert maps[0].shape == photo.shape[:2] and np.allclose(scores, canvas_scores, rtol=1e-5)


def test_tampered_or_incomplete_export_refused(exported, tmp_path):
    copy_dir = tmp_path / "e"
    shutil.copytree(exported, copy_dir)
    data = bytearray((copy_dir / "scorer.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy_dir / "scorer.onnx").write_bytes(bytes(data))
    with pytest.raises(tables.ExportError, match="scorer.onnx: checksum mismatch"):
        load_exported(copy_dir)
    (copy_dir / "c_emb.arrow").unlink()
    with pytest.raises(tables.ExportError, match="c_emb.arrow: missing"):
        tables.verify_export(copy_dir)
    (copy_dir / "manifest.json").unlink()
    with pytest.raises(tables.ExportError, match="manifest.json is missing"):
        load_exported(copy_dir)


@pytest.mark.parametrize("edit, says", [
    (lambda m: m["pipeline"].append("refiner"), "pipeline names ['refiner'], not a graph"),
    (lambda m: m["tables"].pop("normalisation"), "tables['normalisation'] is missing"),
    (lambda m: m["scorer"].pop("coresets"), "scorer['coresets'] is None"),
    (lambda m: m.update(max_batch=-3), "max_batch is -3, not a whole number >= 1"),
])
def test_edited_manifest_sections_refused_naming_the_key(exported, tmp_path, edit, says):
    """Sections that disagree (a stage with no graph, no normalisation table) are refused when the manifest
    is read, naming manifest.json, not as a KeyError mid-run."""
    folder = tmp_path / "e"
    shutil.copytree(exported, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(tables.ExportError, match=re.escape(f"{folder / 'manifest.json'}: {says}")):
        load_exported(folder, threads=1)


def test_export_directory_contents(exported, bundle_tiny):
    m = tables.verify_export(exported)
    assert m["pipeline"] == ["backbone", "mlp", "softmax", "scorer"]
    assert set(m["files"]) == {"backbone.onnx", "mlp.onnx", "softmax.onnx", "scorer.onnx", "c_emb.arrow", "c_dist.arrow",
                               "emb_to_dist.arrow", "position_prior.arrow", "normalisation.arrow"}
    for name in ("torch", "onnx", "onnxruntime", "pni_ray", "pyarrow"):
        assert m["versions"][name]
    st = tables.ScoringTables.read(exported)
    bundle_memory = tables.read_arrow(bundle_tiny / "memory.arrow")
    d = m["feature_dim"]
    np.testing.assert_array_equal(st.memory, bundle_memory.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, d))
    np.testing.assert_array_equal(st.emb_to_dist, bundle_memory.column("dist_index").to_numpy())
    prior = tables.read_arrow(bundle_tiny / "position_prior.arrow")  # the exported copy lost its own after the load
    np.testing.assert_array_equal(st.prior_position, prior.column("position").to_numpy())
    np.testing.assert_array_equal(st.prior_entry, prior.column("entry").to_numpy())
    np.testing.assert_array_equal(st.prior_prob, prior.column("prob").to_numpy())
    assert st.grid == (int(prior.schema.metadata[b"grid_h"]), int(prior.schema.metadata[b"grid_w"]))
    assert (m["model_id"], m["category"]) == (bundle_model_id(bundle_tiny), "washer")  # not the rewritten manifest's
    assert tables.read_normalisation(exported / "normalisation.arrow")["threshold"] == m["threshold"]
    for name in m["pipeline"]:  # dynamic batch axis only
        model = onnx.load(str(exported / m["graphs"][name]["file"]))
        for vi in list(model.graph.input) + list(model.graph.output):
            dims = vi.type.tensor_type.shape.dim
            assert dims[0].dim_param == "batch" and all(d.HasField("dim_value") for d in dims[1:])


def test_external_data_when_over_the_limit(exported, images, tmp_path):
    model = onnx.load(str(exported / "scorer.onnx"))
    record = save_graph(model, tmp_path, "scorer", external_data_bytes=0)
    assert record["external_data"] == ["scorer.onnx.data"]
    assert (tmp_path / "scorer.onnx.data").stat().st_size > (tmp_path / "scorer.onnx").stat().st_size
    feats = _session(exported / "backbone.onnx").run(None, {"images": images[:1]})[0]
    feeds = {"features": feats, "probabilities": _probabilities(exported, feats)}
    a = _session(exported / "scorer.onnx").run(["maps"], feeds)[0]
    b = _session(tmp_path / "scorer.onnx").run(["maps"], feeds)[0]
    np.testing.assert_array_equal(a, b)


def test_export_is_atomic(bundle_tiny, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    import pni_ray.export.onnx_export

    monkeypatch.setattr(pni_ray.export.onnx_export, "trace_to_onnx", boom)  # fails after the temp dir exists
    with pytest.raises(RuntimeError, match="disk full"):
        export_bundle(bundle_tiny, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        export_bundle(bundle_tiny, tmp_path / "out")


# ---------------------------------------------------------------- op check


def test_exported_graphs_pass_the_tensorrt_op_check(exported):
    m = json.loads((exported / "manifest.json").read_text())
    assert all(r["ok"] for r in m["opcheck"]["reports"])
    for name in m["pipeline"]:
        report = opcheck.check_model(exported / m["graphs"][name]["file"])
        assert report.ok, report.summary()
        assert set(report.ops) <= opcheck.TRT10_OPS


def _tiny_graph(op: str = "Relu", dims=("batch", 3, 8, 8), domain: str = "", opset: int = 17) -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports)


def test_op_check_rejects_unsupported_ops_dynamic_shapes_and_opsets():
    assert opcheck.check_model(_tiny_graph()).ok
    bad_op = opcheck.check_model(_tiny_graph("Det", dims=("batch", 3, 3)))
    assert not bad_op.ok and any("operator Det is not supported" in p for p in bad_op.problems)
    dynamic = opcheck.check_model(_tiny_graph(dims=("batch", 3, "height", "width")))
    assert not dynamic.ok and any("dynamic non-batch axis [2, 3]" in p for p in dynamic.problems)
    no_batch = opcheck.check_model(_tiny_graph(dims=(None, 3, 8, 8)))
    assert not no_batch.ok
    custom = opcheck.check_model(_tiny_graph("MyOp", domain="com.example"))
    assert any("needs a TensorRT plugin" in p for p in custom.problems)
    assert any("opset 21" in p for p in opcheck.check_model(_tiny_graph(opset=21)).problems)
    nonzero = opcheck.check_model(_tiny_graph("NonZero", dims=("batch", 3)))
    assert any("data-dependent shape" in p for p in nonzero.problems)
    with pytest.raises(opcheck.OpCheckError, match="Det"):
        opcheck.require_ok([bad_op])


def test_op_check_rejects_runtime_reduce_axes():
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=3, end=4),
             helper.make_node("Sub", ["s", "one"], ["axes"]),
             helper.make_node("ReduceMax", ["x", "axes"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(np.array([1], np.int64), "one")])
    report = opcheck.check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert any("must be a build-time constant" in p for p in report.problems)


# ---------------------------------------------------------------- TensorRT


needs_no_trt = pytest.mark.skipif(not trt.missing_requirements(), reason="TensorRT and a GPU are present here")


@needs_no_trt
def test_trt_flag_fails_clearly_and_leaves_the_onnx_export(cli_trt, images, reference):
    result, out = cli_trt
    assert result.exit_code != 0
    msg = result.output
    assert "TensorRT engines were not built" in msg and "TensorRT Python package" in msg
    assert f"python -m pni_ray.export.trt {out} --max-batch 4 --fp16" in msg
    for graph in ("backbone", "mlp", "softmax", "scorer"):
        assert f"trtexec --onnx={out / (graph + '.onnx')} --saveEngine={out / (graph + '.engine')}" in msg
    assert "--minShapes=images:1x3x128x128 --optShapes=images:4x3x128x128 --maxShapes=images:4x3x128x128 --fp16" in msg
    assert f"python -m pni_ray.export.trt {out} --register --max-batch 4 --fp16" in msg  # trtexec's engines, recorded
    assert "memory_neg2t:" in msg  # coresets-as-inputs: the static tables have fixed profile shapes
    scorer_line = next(line for line in msg.splitlines() if "scorer.onnx" in line and "trtexec" in line)
    assert "--fp16" not in scorer_line  # the scorer stays FP32
    softmax_line = next(line for line in msg.splitlines() if "softmax.onnx" in line and "trtexec" in line)
    assert "--fp16" not in softmax_line and "--minShapes=logits:1x16x16x64" in softmax_line  # probabilities FP32
    mlp_line = next(line for line in msg.splitlines() if "mlp.onnx" in line and "trtexec" in line)
    assert "--fp16" in mlp_line
    # the ONNX + Arrow export is complete, verified and usable
    m = tables.verify_export(out)
    assert m["scorer"]["coresets"] == "input" and not list(out.glob("*.engine"))
    maps, scores = load_exported(out, threads=1).predict(images)
    fig = parity_figures(*reference, maps, scores)
    assert fig["max_rel_error"] <= 1e-3 and fig["ranking_identical"], fig


def test_trt_build_with_a_stand_in_tensorrt(exported, tmp_path, monkeypatch):
    """build_engines' calls into the TensorRT 10 API: profiles, FP16 per graph, files, manifest."""
    calls = stand_in_tensorrt(monkeypatch)
    monkeypatch.setattr(trt, "_cuda_device_problem", lambda: None)
    folder = tmp_path / "e"
    shutil.copytree(exported, folder)
    info = trt.build_engines(folder, max_batch=6, fp16=True)
    assert info["status"] == "built" and info["tensorrt_version"] == "10.3.0"
    assert calls["backbone.onnx"]["profile"] == {"images": ((1, 3, 128, 128), (6, 3, 128, 128), (6, 3, 128, 128))}
    assert calls["backbone.onnx"]["flags"] == ["fp16"] and calls["mlp.onnx"]["flags"] == ["fp16"]
    assert calls["scorer.onnx"]["flags"] == [] and calls["softmax.onnx"]["flags"] == []
    assert all(c["network_flags"] == 0 for c in calls.values())  # FP32 graphs: weakly typed
    assert set(calls["scorer.onnx"]["profile"]) == {"features", "probabilities"}
    assert (folder / "scorer.engine").read_bytes() == b"engine:scorer.onnx"
    m = tables.verify_export(folder)  # engines are checksummed into the manifest
    assert set(m["tensorrt"]["engines"]) == {"backbone", "mlp", "softmax", "scorer"} and "scorer.engine" in m["files"]


def test_tensorrt_other_than_10_is_refused_by_name(monkeypatch):
    """TensorRT 11 removed the FP16 builder flag the build sets: it is named as missing, not met by an AttributeError."""
    stand_in_tensorrt(monkeypatch)
    monkeypatch.setattr(trt, "_cuda_device_problem", lambda: None)
    assert trt.missing_requirements() == []
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "11.4.0.106")
    assert trt.missing_requirements() == ["TensorRT 10.x (found tensorrt 11.4.0.106: `pip install 'tensorrt>=10,<11'`)"]


def test_an_input_outside_the_engine_profile_is_said_by_name(tmp_path):
    """TensorRT 10's set_input_shape returns False for a shape outside the profile; the runtime says so."""
    engine = trt._Engine.__new__(trt._Engine)
    engine.path = tmp_path / "mlp.engine"
    engine.context = type("Context", (), {"set_input_shape": lambda self, name, shape: shape[0] <= 4})()
    engine._set_shape("features", (4, 64, 16, 16))
    with pytest.raises(RuntimeError, match=r"mlp.engine: input 'features' of shape \(5, 64, 16, 16\) is outside"):
        engine._set_shape("features", (5, 64, 16, 16))


def test_engine_batch_below_one_refused(exported, tmp_path, capsys):
    """An engine profile's largest batch below 1 would make the runtime's batch loop score nothing: refused
    on the command line, by build/register, and in a hand-edited engine record."""
    folder = tmp_path / "e"
    shutil.copytree(exported, folder)
    for bad in ("0", "-3", "two"):
        with pytest.raises(SystemExit) as exit_info:
            trt.main([str(folder), "--register", "--max-batch", bad])
        assert exit_info.value.code == 2 and "whole number >= 1" in capsys.readouterr().err
    for graph in ("backbone", "mlp", "softmax", "scorer"):
        (folder / f"{graph}.engine").write_bytes(f"trtexec:{graph}".encode())
    with pytest.raises(ValueError, match="largest batch must be a whole number >= 1, got -3"):
        trt.register_engines(folder, -3)
    trt.register_engines(folder, 2)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tensorrt"]["engines"]["mlp"]["max_batch"] = -3
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="got -3"):
        trt.TRTModel(folder, verify=False)


def test_engines_built_by_trtexec_are_registered_and_checksummed(exported, tmp_path, monkeypatch):
    """`--register` records engine files built elsewhere (trtexec) as build_engines does, each checksummed
    (TRTModel runs only recorded engines); a missing engine file is refused, naming it."""
    folder = tmp_path / "e"
    shutil.copytree(exported, folder)
    assert trt.main([str(folder), "--register", "--max-batch", "6", "--fp16"]) == 2  # no engine files yet
    for graph in ("backbone", "mlp", "softmax"):
        (folder / f"{graph}.engine").write_bytes(f"trtexec:{graph}".encode())
    with pytest.raises(tables.ExportError, match="no engine file scorer.engine"):
        trt.register_engines(folder, 6, fp16=True)
    (folder / "scorer.engine").write_bytes(b"trtexec:scorer")
    assert trt.main([str(folder), "--register", "--max-batch", "6", "--fp16"]) == 0
    m = tables.verify_export(folder)
    engines = m["tensorrt"]["engines"]
    assert m["tensorrt"]["status"] == "registered" and set(engines) == {"backbone", "mlp", "softmax", "scorer"}
    assert engines["mlp"]["fp16"] and not engines["scorer"]["fp16"] and engines["scorer"]["max_batch"] == 6
    assert m["files"]["scorer.engine"]["sha256"] == tables.sha256_file(folder / "scorer.engine")
    (folder / "mlp.engine").write_bytes(b"changed after registering")
    with pytest.raises(tables.ExportError, match="mlp.engine"):
        tables.verify_export(folder)


# ---------------------------------------------------------------- coresets as inputs, polygraphy, refiner


def test_coresets_as_inputs_match_constants(cli_trt, exported, images):
    _, out = cli_trt
    a = load_exported(exported, threads=1).predict(images[:4])
    b = load_exported(out, threads=1).predict(images[:4])
    np.testing.assert_allclose(b[0], a[0], rtol=1e-5, atol=1e-6)
    staged = load_exported(out, threads=1, fuse=False)  # the tables fed by name to the scorer stage alone
    np.testing.assert_allclose(staged.predict(images[:4])[0], a[0], rtol=1e-5, atol=1e-6)
    assert {i.name for i in _session(out / "scorer.onnx").get_inputs()} == {
        "features", "probabilities", "memory_neg2t", "memory_sq", "emb_to_dist", "mask_threshold", "position_penalty"}


@pytest.mark.skipif(shutil.which("polygraphy") is None and not (Path(sys.executable).parent / "polygraphy").exists(),
                    reason="polygraphy not installed")
def test_polygraphy_runs_every_graph_with_onnxrt(exported):
    exe = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    m = json.loads((exported / "manifest.json").read_text())
    for name in m["pipeline"]:
        graph = m["graphs"][name]
        shapes = [f"{s['name']}:[{','.join(str(1 if not isinstance(d, int) else d) for d in s['shape'])}]" for s in graph["inputs"]]
        proc = subprocess.run([exe, "run", str(exported / graph["file"]), "--onnxrt", "--input-shapes", *shapes],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "PASSED" in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_refiner_graph_and_refined_scores(trained_tiny, images, synthetic_root, tmp_path):
    refiner_mod = pytest.importorskip("pni_ray.models.refiner")
    from pni_ray.bundle import save_bundle
    from pni_ray.config import RefinerConfig

    cfg = RefinerConfig(enabled=True, pretrained=False, image_size=64, decoder_channels=(32, 24, 16, 16, 8))
    trained = copy.copy(trained_tiny)
    trained.config = trained.config.replace(refiner=cfg)
    refiner = refiner_mod.build_refiner(cfg, pretrained=False)
    refiner.set_map_statistics(trained.normalisation.pixel_mean, trained.normalisation.pixel_std)
    torch.nn.init.normal_(refiner.head.weight, std=0.1)  # a non-trivial residual
    trained.refiner = refiner
    bundle = save_bundle(trained, tmp_path / "bundle")
    out = export_bundle(bundle, tmp_path / "export", ExportOptions(max_batch=4)).path
    detector = load_detector(bundle)[0]
    m = tables.verify_export(out)
    assert m["pipeline"][-1] == "refiner" and m["graphs"]["refiner"]["outputs"][1]["name"] == "scores"
    x = torch.from_numpy(images[:3])
    with torch.no_grad():
        maps_in = detector(x, refine=False)[0]
        ref = detector.refiner(x, maps_in).numpy()
    refined, scores = _session(out / "refiner.onnx").run(None, {"images": images[:3], "maps": maps_in.numpy()})
    assert _rel(refined, ref) < 1e-4
    np.testing.assert_allclose(scores, refined.reshape(3, -1).max(1))
    fused = load_exported(out, threads=1)
    assert fused.fused[0] == tuple(m["pipeline"])  # the refiner is fused too: it reads `images` like the backbone
    fig = parity_figures(*torch_reference(detector, images), *fused.predict(images))
    assert fig["max_rel_error"] <= 1e-3 and fig["ranking_identical"], fig
    staged = load_exported(out, threads=1, fuse=False).predict(images)
    np.testing.assert_allclose(fused.predict(images)[0], staged[0], rtol=1e-5, atol=1e-6)
    # `pni-ray evaluate EXPORT`: the refined export is evaluated as "pni+refine", with the bundle's metrics
    from pni_ray.cli import main

    runner = CliRunner()
    runs = {"bundle": [str(bundle)], "export": [str(out)]}
    if importlib.util.find_spec("openvino") is not None:  # the refiner reads `images` beside OpenVINO's features
        runs["openvino"] = [str(out), "--backbone-runtime", "openvino", "--backbone-precision", "f32"]
    figures = {}
    for name, args in runs.items():
        result = runner.invoke(main, ["evaluate", args[0], str(synthetic_root), *args[1:], "--threads", "1",
                                      "--json", str(tmp_path / f"{name}.json")])
        assert result.exit_code == 0, result.output
        figures[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for name in runs:
        assert figures[name]["mode"] == "pni+refine", figures
        for key in ("pixel_auroc", "aupro"):
            assert abs(figures[name][key] - figures["bundle"][key]) <= 2e-3, (name, key, figures)
    lone = runner.invoke(main, ["evaluate", str(out), str(synthetic_root), "--backbone-precision", "bf16"])
    assert lone.exit_code != 0 and "needs --backbone-runtime openvino" in lone.output
    lone = runner.invoke(main, ["evaluate", str(bundle), str(synthetic_root), "--backbone-precision", "bf16"])
    assert lone.exit_code != 0 and "apply to export directories" in lone.output


@pytest.mark.parametrize("chunks", ["one", "several"])
@pytest.mark.parametrize("mode", ["position", "pni"])
def test_candidate_scorer_graph_equals_torch(mode, chunks, monkeypatch):
    """The candidate graph (each position's allowed entries only, positions that allow nothing
    searched densely) chooses what torch's candidate path and its dense definition choose, in one
    chunk of positions (what the byte budget gives small grids) or several (large grids)."""
    from pni_ray.models.scorer import position_candidates

    if chunks == "several":
        monkeypatch.setattr(scorer_graph, "CANDIDATE_CHUNK_BYTES", 0)  # chunks of spec.chunk = 7 positions

    from pni_ray.models.scorer import PatchScorer

    dense, st, features, probs = _random_scorer("both")
    assert not dense.uses_candidates(mode)  # its flat position allows 200 of 300 entries
    scorer = PatchScorer(dense.memory, dense.emb_to_dist, dense.position_prior, tau_scale=0.9, candidate_share=1.0)
    assert scorer.uses_candidates(mode) and scorer.candidates.shape[1] == 200
    masks = tables.mask_spec(mode, st, scorer.tau, "both")
    table, empty = tables.candidate_table(masks)
    torch_table, torch_empty = position_candidates(scorer.position_prior > scorer.tau)
    assert np.array_equal(table, torch_table.numpy()) and empty.tolist() == [0, 7] == torch_empty.nonzero().flatten().tolist()
    spec = scorer_graph.ScorerSpec(mode=mode, memory=st.memory, emb_to_dist=st.emb_to_dist, masks=masks, grid=(6, 5),
                                   image_size=(48, 40), blur_sigma=1.0, n_dist=probs.shape[1], chunk=7,
                                   candidates=table, empty_positions=empty)
    model = scorer_graph.build_scorer_graph(spec)
    assert opcheck.check_model(model, name=mode).ok
    assert "ScatterElements" in {n.op_type for n in model.graph.node}  # the empty positions' dense search
    n_matmuls = sum(n.op_type == "MatMul" and n.input[0].startswith("rows_pbd") for n in model.graph.node)
    assert n_matmuls == (1 if chunks == "one" else 5)  # 30 positions
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"features": features.numpy()}
    if mode == "pni":
        feeds["probabilities"] = probs.permute(0, 2, 3, 1).numpy()
    patch = session.run(["patch_scores"], feeds)[0]
    with torch.no_grad():
        ref = dense(features, probs, mode, exact_dense=True).numpy()
        assert np.array_equal(scorer(features, probs, mode).numpy(), ref)
    assert np.abs(patch - ref).max() < 1e-5  # same choices; only the last reduction's rounding differs
    with pytest.raises(ValueError, match="candidate search"):
        bad = scorer_graph.ScorerSpec(mode="neighbourhood", memory=st.memory, emb_to_dist=st.emb_to_dist, masks=masks,
                                      grid=(6, 5), image_size=(48, 40), blur_sigma=1.0, n_dist=probs.shape[1],
                                      candidates=table)
        scorer_graph.build_scorer_graph(bad)


def test_candidate_graph_memory_bound(exported, bundle_tiny, tmp_path, monkeypatch):
    """Long candidate lists would fold into GBs of constants: above the cap the export stays dense."""
    assert scorer_graph.folded_candidate_bytes(np.zeros((1600, 165), np.int64), 168) == 1600 * 165 * 169 * 4
    assert scorer_graph.folded_candidate_bytes(np.zeros((1600, 3760), np.int64), 168) > scorer_graph.MAX_CANDIDATE_BYTES
    manifest = tables.read_manifest(exported)
    if manifest["mode"] not in ("pni", "position"):
        pytest.skip("the tiny bundle scores in a mode without candidates")
    k = manifest["scorer"]["candidates_per_position"]
    if k is None:
        pytest.skip("the tiny bundle's prior is too broad for candidates")
    monkeypatch.setattr(scorer_graph, "MAX_CANDIDATE_BYTES", 0)
    out = export_bundle(bundle_tiny, tmp_path / "dense", ExportOptions(max_batch=4)).path
    assert tables.read_manifest(out)["scorer"]["candidates_per_position"] is None


def test_an_export_in_another_mode_than_the_bundles_has_no_threshold(bundle_tiny, exported, tmp_path, caplog):
    """The bundle's threshold bounds held-out scores of its own mode: carried into a patchcore export (scores on
    another scale) it missed defects on real bottle (57 of 63 flagged, 63 at patchcore's own threshold)."""
    bundle_threshold = json.loads((bundle_tiny / "manifest.json").read_text())["threshold"]
    assert json.loads((exported / "manifest.json").read_text())["threshold"] == bundle_threshold  # its own mode: kept
    assert json.loads((exported / "manifest.json").read_text())["trained_on"] == "colour"  # scoring's grey hint
    with caplog.at_level("WARNING"):
        out = export_bundle(bundle_tiny, tmp_path / "pc", ExportOptions(max_batch=4, mode="patchcore")).path
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mode"] == "patchcore" and manifest["threshold"] is None
    assert "calibrated on pni-mode scores; the export scores in mode patchcore, so it has no threshold" in caplog.text
    assert load_exported(out, threads=1).threshold == float("inf")  # decides nothing: is_anomalous null
    # a bundle whose position check dropped p(c|x) scores in neighbourhood mode: a pni export is told how to keep it
    dropped = tmp_path / "dropped"
    shutil.copytree(bundle_tiny, dropped)
    bundle_manifest = json.loads((dropped / "manifest.json").read_text())
    bundle_manifest["config"]["scoring"]["mode"] = "neighbourhood"
    bundle_manifest["training"]["position_check"] = {"kept": False, "requested_mode": "pni"}
    (dropped / "manifest.json").write_text(json.dumps(bundle_manifest))
    caplog.clear()
    with caplog.at_level("WARNING"):
        export_bundle(dropped, tmp_path / "dropped-pni", ExportOptions(max_batch=4, mode="pni"))
    assert "its position check dropped p(c|x): retrain with a --config file holding" in caplog.text
