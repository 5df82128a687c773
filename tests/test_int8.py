"""`pni-ray export --int8`: static QDQ graphs calibrated on good images, what they keep, what they refuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from pni_ray.export import opcheck, quantize, tables, trt
from pni_ray.export.onnx_export import ExportOptions, export_bundle
from pni_ray.export.runtime import load_exported
from pni_ray.data.mvtec import load_category
from pni_ray.data.transforms import load_batch
from trt_stand_in import STRONGLY_TYPED
from trt_stand_in import install as stand_in_tensorrt


def _session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def good_dir(synthetic_root):
    return synthetic_root / "washer" / "train" / "good"


@pytest.fixture(scope="module")
def images(synthetic_root) -> np.ndarray:
    return load_batch([s.path for s in load_category(synthetic_root, "washer").test], 128).numpy()


@pytest.fixture(scope="module")
def fp32_export(bundle_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "washer"
    export_bundle(bundle_tiny, out, ExportOptions(max_batch=4))
    return out


TRT_INT8 = dict(max_batch=4, int8=("mlp",), calibration_images=8, int8_activations="int8")


@pytest.fixture(scope="module")
def int8_export(bundle_tiny, good_dir, tmp_path_factory):
    """The MLP in symmetric int8: the form TensorRT builds."""
    out = tmp_path_factory.mktemp("int8") / "washer"
    export_bundle(bundle_tiny, out, ExportOptions(calibration=good_dir, **TRT_INT8))
    return out


@pytest.fixture(scope="module")
def cpu_int8_export(bundle_tiny, good_dir, tmp_path_factory):
    """Backbone and MLP with the defaults: uint8 activations (onnxruntime), leading convolutions FP32."""
    out = tmp_path_factory.mktemp("int8cpu") / "washer"
    export_bundle(bundle_tiny, out, ExportOptions(max_batch=4, int8=("backbone", "mlp"), calibration=good_dir,
                                                  calibration_images=8))
    return out


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_only_the_chosen_graph_is_quantised_and_recorded(int8_export, good_dir):
    m = tables.verify_export(int8_export)  # checksummed like any export
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(int8_export / "mlp.onnx")
    for name in ("backbone", "softmax", "scorer"):
        assert "QuantizeLinear" not in _ops(int8_export / f"{name}.onnx"), name
    assert m["int8"]["graphs"] == ["mlp"]
    assert m["int8"]["activations"] == "int8" and m["int8"]["tensorrt"]
    assert len(m["int8"]["calibration_images"]) == 8
    assert m["int8"]["calibration_dir"] == str(good_dir.resolve())
    weights = [t for t in onnx.load(str(int8_export / "mlp.onnx")).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights, "the MLP's weights are stored as int8"
    zero_points = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(int8_export / "mlp.onnx")).graph.initializer
                   if t.name.endswith("zero_point")]
    assert zero_points and all(not z.any() for z in zero_points)  # symmetric: what TensorRT takes


def test_int8_mlp_keeps_the_fp32_choices(int8_export, fp32_export, images):
    """The INT8 MLP predicts what the FP32 one does, and the maps it leads to stay those of FP32."""
    feats = _session(fp32_export / "backbone.onnx").run(None, {"images": images[:4]})[0]
    a = _session(fp32_export / "mlp.onnx").run(None, {"features": feats})[0]
    b = _session(int8_export / "mlp.onnx").run(None, {"features": feats})[0]
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9
    assert np.abs(a - b).mean() < 0.05 * np.abs(a).mean()
    maps32, scores32 = load_exported(fp32_export, threads=1).predict(images)
    maps8, scores8 = load_exported(int8_export, threads=1).predict(images)
    assert np.corrcoef(maps32.ravel(), maps8.ravel())[0, 1] > 0.99
    assert np.corrcoef(scores32, scores8)[0, 1] > 0.99


def test_int8_export_is_deterministic(bundle_tiny, good_dir, int8_export, tmp_path):
    """Also across the caller's torch thread count: the MLP's calibration features come from torch,
    whose conv floats follow the thread count (the INT8 ranges, and so the file, moved with it)."""
    import torch

    threads = torch.get_num_threads()
    for n in (1, 2):
        again = tmp_path / f"again-{n}"
        torch.set_num_threads(n)
        try:
            export_bundle(bundle_tiny, again, ExportOptions(calibration=good_dir, **TRT_INT8))
        finally:
            torch.set_num_threads(threads)
        assert tables.sha256_file(again / "mlp.onnx") == tables.sha256_file(int8_export / "mlp.onnx"), n


def test_cpu_int8_backbone_keeps_its_first_convolutions_fp32(cpu_int8_export, fp32_export, images):
    """uint8 activations (asymmetric) everywhere but the backbone's first convolutions, which read float
    weights; the maps stay those of FP32."""
    m = tables.verify_export(cpu_int8_export)
    assert m["int8"]["activations"] == "uint8" and not m["int8"]["tensorrt"]
    kept = m["int8"]["fp32_nodes"]["backbone"]
    assert len(kept) == quantize.DEFAULT_FP32_CONVS and m["int8"]["fp32_nodes"]["mlp"] == []
    graph = onnx.load(str(cpu_int8_export / "backbone.onnx")).graph
    dequantised = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    float_weights = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert [c.name for c in convs[: len(kept)]] == kept
    assert all(c.input[1] in float_weights for c in convs[: len(kept)])
    assert all(c.input[1] in dequantised for c in convs[len(kept):])
    zero_types = {t.data_type for t in graph.initializer if t.name.endswith("zero_point") and not t.dims}
    assert zero_types == {onnx.TensorProto.UINT8}
    maps32, scores32 = load_exported(fp32_export, threads=1).predict(images)
    fused = load_exported(cpu_int8_export, threads=1)
    maps8, scores8 = fused.predict(images)
    assert np.corrcoef(maps32.ravel(), maps8.ravel())[0, 1] > 0.99
    # fused, onnxruntime's Q/DQ passes see across the backbone -> MLP boundary: still the stages' maps
    assert fused.fused is not None
    staged = load_exported(cpu_int8_export, threads=1, fuse=False).predict(images)[0]
    np.testing.assert_allclose(maps8, staged, rtol=1e-5, atol=1e-5 * float(np.abs(staged).max()))
    assert np.corrcoef(scores32, scores8)[0, 1] > 0.99


@pytest.fixture(scope="module")
def inside_int8_export(synthetic_root, good_dir, tmp_path_factory):
    """An INT8 backbone export of a bundle pooled the earlier way (pool_padding "inside", what bundles written
    before the setting keep); patchcore mode: the backbone graph is what is tested."""
    import dataclasses

    from conftest import tiny_config
    from pni_ray.bundle import save_bundle
    from pni_ray.training import train_category

    base = tiny_config()
    cfg = tiny_config(mode="patchcore", features=dataclasses.replace(base.features, pool_padding="inside"))
    bundle = save_bundle(train_category(synthetic_root, "washer", cfg, progress=False),
                         tmp_path_factory.mktemp("inside") / "washer")
    out = tmp_path_factory.mktemp("int8inside") / "washer"
    export_bundle(bundle, out, ExportOptions(max_batch=4, int8=("backbone",), calibration=good_dir, calibration_images=8))
    return out


@pytest.mark.parametrize("export_fixture", ["cpu_int8_export", "inside_int8_export"])
def test_openvino_runs_the_int8_backbone_as_onnxruntime_does(export_fixture, images, request):
    """The INT8 backbone in OpenVINO (f32 plugin) computes onnxruntime's features up to quantisation's
    rounding, for both border rules. With the 3 x 3 mean as one AveragePool counting its padding, OpenVINO's
    CPU plugin gave features off by up to 94% of their range (bottle image AUROC 0.65); padded explicitly, 5%."""
    exported = request.getfixturevalue(export_fixture)
    pools = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in onnx.load(str(exported / "backbone.onnx")).graph.node if n.op_type == "AveragePool"]
    assert pools and not [p for p in pools if p.get("count_include_pad") == 1 and any(p.get("pads", []))], pools
    pytest.importorskip("openvino")
    from pni_ray.export.openvino_backbone import OpenVINOBackbone

    ref = _session(exported / "backbone.onnx").run(None, {"images": images[:4]})[0]
    got = OpenVINOBackbone(exported / "backbone.onnx", threads=1, precision="f32").run({"images": images[:4]})["features"]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 0.15 * np.abs(ref).max(), np.abs(got - ref).max() / np.abs(ref).max()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.99


def test_uint8_graphs_are_refused_by_tensorrt_with_what_to_do(cpu_int8_export, int8_export, tmp_path, monkeypatch):
    """The op check names the asymmetric Q/DQ; a TensorRT build of such an export says how to re-export,
    before looking for TensorRT; `--trt` with explicit uint8 is a usage error; `--trt` alone picks int8."""
    from pni_ray.cli import main

    report = opcheck.check_model(cpu_int8_export / "backbone.onnx")
    assert not report.ok and all("--int8-activations int8" in p for p in report.problems)
    assert opcheck.check_model(cpu_int8_export / "softmax.onnx").ok
    other = opcheck.OpCheckReport(report.graph, report.target, problems=[*report.problems, "opset 99 is outside"])
    assert opcheck.without_asymmetric_qdq(report).ok
    assert opcheck.without_asymmetric_qdq(other).problems == ["opset 99 is outside"]  # only the Q/DQ form is excused
    with pytest.raises(ValueError, match="re-export with --int8-activations int8"):
        trt.build_engines(cpu_int8_export, max_batch=4)
    bundle = tables.read_manifest(int8_export)["source_bundle"]["path"]
    args = ["export", bundle, "--int8", "mlp", "--calibration", str(tmp_path), "--trt"]
    result = CliRunner().invoke(main, [*args[:2], "--out", str(tmp_path / "e"), *args[2:], "--int8-activations", "uint8"])
    assert result.exit_code != 0 and "TensorRT takes symmetric int8" in result.output
    for extra, says in ((["--int8-activations", "int8"], "add --int8 mlp"), (["--int8-fp32-convs", "3"], "add --int8 mlp"),
                        (["--int8-weight-bits", "8"], "add --int8 mlp"), (["--int8-weight-bits", "7"], "add --int8 mlp"),
                        (["--int8-fp32-convs", "6"], "add --int8 mlp"),  # the default value, given, is not ignored either
                        (["--calibration-images", "5"], "add --int8 mlp"), (["--fp16"], "add --trt")):
        result = CliRunner().invoke(main, ["export", bundle, "--out", str(tmp_path / "x"), *extra])
        assert result.exit_code == 2 and says in result.output  # never silently ignored
        assert not (tmp_path / "x").exists()  # refused before any work
    result = CliRunner().invoke(main, ["export", bundle, "--out", str(tmp_path / "x"), "--int8", "mlp",
                                       "--calibration", str(tmp_path), "--int8-fp32-convs", "3"])
    assert result.exit_code != 0 and "add --int8 backbone" in result.output
    stand_in_tensorrt(monkeypatch)
    monkeypatch.setattr(trt, "_cuda_device_problem", lambda: None)
    good = tables.read_manifest(int8_export)["int8"]["calibration_dir"]
    result = CliRunner().invoke(main, ["export", bundle, "--out", str(tmp_path / "e"), "--int8", "mlp",
                                       "--calibration", good, "--calibration-images", "4", "--trt"])
    assert result.exit_code == 0, result.output
    assert "7-bit weight range" in result.output
    assert tables.read_manifest(tmp_path / "e")["int8"]["activations"] == "int8"
    assert tables.read_manifest(tmp_path / "e")["int8"]["weight_bits"] == 7  # --trt keeps 7 unless asked
    result = CliRunner().invoke(main, ["export", bundle, "--out", str(tmp_path / "e8"), "--int8", "mlp",
                                       "--calibration", good, "--calibration-images", "4", "--int8-weight-bits", "8"])
    assert result.exit_code == 0, result.output
    assert tables.read_manifest(tmp_path / "e8")["int8"]["weight_bits"] == 8


def _int8_weights(path) -> list[np.ndarray]:
    return [onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]


def _activation_scales(path) -> list[float]:
    """The scales of the graph's QuantizeLinear nodes: what the activations are quantised with at run time."""
    graph = onnx.load(str(path)).graph
    values = {t.name: float(onnx.numpy_helper.to_array(t)) for t in graph.initializer if not t.dims}
    return [values[n.input[1]] for n in graph.node if n.op_type == "QuantizeLinear"]


def test_weights_keep_to_seven_bits_unless_asked(bundle_tiny, good_dir, int8_export, tmp_path):
    """7-bit weights (the default): a u8 x s8 pair sums within int16 (2 x 255 x 64 < 32767), so CPUs
    without VNNI, whose onnxruntime kernels add such pairs in int16 and saturate, compute what VNNI
    CPUs do. 8 bits fill the int8 range, recorded in the manifest."""
    seven = _int8_weights(int8_export / "mlp.onnx")
    assert seven and all(np.abs(w).max() <= 64 for w in seven)
    assert max(np.abs(w).max() for w in seven) == 64
    assert tables.read_manifest(int8_export)["int8"]["weight_bits"] == 7
    out = tmp_path / "eight"
    export_bundle(bundle_tiny, out, ExportOptions(calibration=good_dir, int8_weight_bits=8, **TRT_INT8))
    assert max(np.abs(w).max() for w in _int8_weights(out / "mlp.onnx")) == 127
    assert tables.read_manifest(out)["int8"]["weight_bits"] == 8
    assert _activation_scales(out / "mlp.onnx") == _activation_scales(int8_export / "mlp.onnx")  # weights only
    with pytest.raises(ValueError, match="--int8-weight-bits 6"):
        ExportOptions(int8=("mlp",), calibration=good_dir, int8_weight_bits=6).validate()


def test_calibration_images_are_spread_over_the_folder(tmp_path):
    for i in range(10):
        (tmp_path / f"{i:02d}.png").write_bytes(b"")
    assert [p.name for p in quantize.calibration_paths(tmp_path, 4)] == ["00.png", "02.png", "05.png", "07.png"]
    assert len(quantize.calibration_paths(tmp_path, 50)) == 10


def test_int8_refuses_what_it_cannot_do(bundle_tiny, good_dir, tmp_path):
    with pytest.raises(ValueError, match="--calibration"):
        ExportOptions(int8=("mlp",)).validate()
    with pytest.raises(ValueError, match="scorer"):
        ExportOptions(int8=("scorer",), calibration=good_dir).validate()
    with pytest.raises(ValueError, match="--int8-activations 'int4'"):
        ExportOptions(int8=("mlp",), calibration=good_dir, int8_activations="int4").validate()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}: no images"):
        export_bundle(bundle_tiny, tmp_path / "e1", ExportOptions(int8=("mlp",), calibration=empty))
    with pytest.raises(ValueError, match="no such graph"):
        export_bundle(bundle_tiny, tmp_path / "e2", ExportOptions(int8=("mlp",), calibration=good_dir, mode="patchcore"))
    assert not list(tmp_path.glob("e[12]*")) and not list(tmp_path.glob(".e[12]*"))  # refused before writing


def test_cli_int8_without_calibration_says_what_to_give(bundle_tiny, tmp_path):
    from pni_ray.cli import main

    result = CliRunner().invoke(main, ["export", str(bundle_tiny), "--out", str(tmp_path / "e"), "--int8", "mlp"])
    assert result.exit_code != 0
    assert "--int8 needs --calibration DIR" in result.output
    assert not (tmp_path / "e").exists()
    # and the other way round: a calibration folder without --int8 would be silently unused
    result = CliRunner().invoke(main, ["export", str(bundle_tiny), "--out", str(tmp_path / "e"),
                                       "--calibration", str(tmp_path)])
    assert result.exit_code == 2 and "add --int8 mlp and/or --int8 backbone" in result.output
    assert not (tmp_path / "e").exists()


def test_trt_builds_int8_graphs_strongly_typed(int8_export, tmp_path, monkeypatch):
    """Q/DQ graphs carry their own precision: a strongly typed network and no FP16 flag, in the API
    build and in the trtexec lines printed where TensorRT is missing."""
    import shutil

    calls = stand_in_tensorrt(monkeypatch)
    monkeypatch.setattr(trt, "_cuda_device_problem", lambda: None)
    folder = tmp_path / "e"
    shutil.copytree(int8_export, folder)
    info = trt.build_engines(folder, max_batch=4, fp16=True)
    assert calls["mlp.onnx"]["network_flags"] == 1 << STRONGLY_TYPED and calls["mlp.onnx"]["flags"] == []
    assert calls["backbone.onnx"]["network_flags"] == 0 and calls["backbone.onnx"]["flags"] == ["fp16"]
    assert info["engines"]["mlp"]["int8"] and not info["engines"]["backbone"]["int8"]
    lines = trt.trtexec_commands(folder, tables.verify_export(folder), 4, fp16=True)
    mlp_line = next(line for line in lines if "mlp.onnx" in line)
    assert "--stronglyTyped" in mlp_line and "--fp16" not in mlp_line


def test_op_check_refuses_what_tensorrt_cannot_dequantise(int8_export):
    """TensorRT's DequantizeLinear takes int8 (fp8, int4) constants only: an int32 bias, what
    quantize_static writes by default, is refused at export; the export's own graphs pass."""
    from onnx import TensorProto, helper, numpy_helper

    bias = numpy_helper.from_array(np.arange(4, dtype=np.int32), "bias_q")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "bias_scale")
    node = helper.make_node("DequantizeLinear", ["bias_q", "bias_scale"], ["bias"], name="bias_dq")
    add = helper.make_node("Add", ["x", "bias"], ["y"], name="add")
    graph = helper.make_graph([node, add], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [bias, scale])
    report = opcheck.check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert not report.ok and any("INT32" in p and "bias_dq" in p for p in report.problems), report.problems
    for name in ("backbone", "mlp"):
        assert opcheck.check_model(int8_export / f"{name}.onnx").ok


def _logit_producer(path) -> tuple[onnx.GraphProto, onnx.NodeProto]:
    graph = onnx.load(str(path)).graph
    return graph, next(n for n in graph.node if "logits" in n.output)


def _classifier(bundle) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's classifier weight (K, hidden) and bias, divided by the temperature as the export folds it."""
    from pni_ray.export.onnx_export import load_source

    mlp = load_source(bundle)[0].mlp
    t = float(mlp.temperature)
    return (mlp.classifier.weight.detach().flatten(1).numpy() / t, mlp.classifier.bias.detach().numpy() / t)


def test_int8_logits_stay_float_with_the_exact_bias(int8_export, cpu_int8_export, fp32_export, bundle_tiny, images):
    """Both INT8 forms quantise the classifier's inputs and weights, never its output: its MatMul feeds
    the bias Add directly (no QuantizeLinear -> DequantizeLinear between them or after), and the bias is
    the model's own float one (not an 8-bit copy). The files stay standard ONNX: TensorRT's op check
    passes the int8 form, and the uint8 form fails it only for its asymmetric Q/DQ."""
    _, bias = _classifier(bundle_tiny)
    feats = _session(fp32_export / "backbone.onnx").run(None, {"images": images[:4]})[0]
    ref = _session(fp32_export / "mlp.onnx").run(None, {"features": feats})[0]
    errors = {}
    for form, folder in (("int8", int8_export), ("uint8", cpu_int8_export)):
        graph, last = _logit_producer(folder / "mlp.onnx")
        values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
        producer = {o: n for n in graph.node for o in n.output}
        matmul = producer[last.input[0]]
        assert (last.op_type, matmul.op_type) == ("Add", "MatMul")
        assert [producer[i].op_type for i in matmul.input] == ["DequantizeLinear"] * 2
        assert [n.op_type for n in graph.node if matmul.output[0] in n.input] == ["Add"]  # no Q/DQ in between
        np.testing.assert_array_equal(values[last.input[1]], bias)
        report = opcheck.check_model(folder / "mlp.onnx")
        assert report.ok if form == "int8" else opcheck.without_asymmetric_qdq(report).ok, report.problems
        (logits,) = _session(folder / "mlp.onnx").run(None, {"features": feats})
        assert (logits.argmax(-1) == ref.argmax(-1)).mean() > 0.9, form
        errors[form] = float(np.abs(logits - ref).mean() / np.abs(ref).mean())
    assert max(errors.values()) < 0.05, errors


def test_onnxruntime_runs_the_classifier_as_one_integer_product(int8_export, cpu_int8_export, bundle_tiny, images):
    """What onnxruntime loads (fused or stage by stage): the classifier as one MatMulIntegerToFloat with
    the float bias fused and uint8 activations (the int8 form's requantised beside it, zero point + 128),
    computing what the file's standard graph computes."""
    import copy

    from pni_ray.export.graph_passes import integer_matmul_to_float

    _, bias = _classifier(bundle_tiny)
    for folder in (int8_export, cpu_int8_export):
        model = load_exported(folder, threads=1)
        graph = model.fused_graph().graph
        fused = [n for n in graph.node if n.domain == "com.microsoft"]
        assert [n.op_type for n in fused] == ["MatMulIntegerToFloat"], folder
        node = fused[0]
        values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
        np.testing.assert_array_equal(values[node.input[6]], bias)
        k = len(bias)
        assert values[node.input[2]].shape == () and values[node.input[3]].shape == (k,)  # a per tensor, w per column
        assert values[node.input[4]].dtype == np.uint8 and values[node.input[4]].shape == ()
        assert values[node.input[5]].shape == (k,) and values[node.input[1]].dtype == np.int8
        staged = load_exported(folder, threads=1, fuse=False)
        np.testing.assert_allclose(model.predict(images[:4])[0], staged.predict(images[:4])[0], rtol=1e-5, atol=1e-5)
        plain = onnx.load(str(folder / "mlp.onnx"))
        rewritten = copy.deepcopy(plain)
        assert integer_matmul_to_float(rewritten) == 1
        shape = [d.dim_value for d in plain.graph.input[0].type.tensor_type.shape.dim[1:]]
        feats = np.random.default_rng(0).random((2, *shape), dtype=np.float32) * 2
        a = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"features": feats})[0]
        b = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"features": feats})[0]
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


def _qdq_matmul(zero_a: np.ndarray, axis: int = 1, bias: bool = True, shared: bool = False,
                output_product: bool = False) -> onnx.ModelProto:
    """x -> QuantizeLinear / DequantizeLinear (scale 0.5, zero point `zero_a`) -> MatMul with int8 weights
    per column -> Add(bias): the INT8 classifier's pattern in small; `shared`: a second MatMul reads the
    same activation; `output_product`: the first MatMul's output is also a graph output."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "sa"), numpy_helper.from_array(zero_a, "za"),
             numpy_helper.from_array(rng.integers(-64, 65, (4, 4)).astype(np.int8), "w"),
             numpy_helper.from_array(rng.random(4).astype(np.float32) + 0.1, "sw"),
             numpy_helper.from_array(np.zeros(4, np.int8), "zw"), numpy_helper.from_array(rng.random(4).astype(np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "sa", "za"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=axis, name="dqw"),
             helper.make_node("MatMul", ["xd", "wd"], ["m" if bias else "y"], name="mm")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])]
    if bias:
        nodes.append(helper.make_node("Add", ["m", "b"], ["y"], name="add"))
    if shared:
        nodes += [helper.make_node("MatMul", ["xd", "wd"], ["m2"], name="mm2"), helper.make_node("Add", ["m2", "b"], ["y2"], name="add2")]
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["batch", 4]))
    if output_product:
        outputs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, ["batch", 4]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])], outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_integer_matmul_to_float_computes_what_the_standard_graph_does():
    """Exact wherever the 8-bit activation rounds half to even or saturates, for int8 zero points at
    both ends and in the middle (requantised to uint8, zero point + 128) and for uint8; an activation two
    products read gets one uint8 twin."""
    import copy

    from pni_ray.export.graph_passes import integer_matmul_to_float

    ties = np.arange(-140, 141, dtype=np.float32) / 2  # every half step over [-70, 70] at scale 0.5: ties, saturation
    x = np.ascontiguousarray(np.resize(ties, (len(ties) // 4 + 1) * 4).reshape(-1, 4))
    for zero in (np.array(-128, np.int8), np.array(0, np.int8), np.array(127, np.int8), np.array(7, np.uint8)):
        for shared in (False, True):
            plain = _qdq_matmul(zero, shared=shared)
            fast = copy.deepcopy(plain)
            assert integer_matmul_to_float(fast) == (2 if shared else 1)
            assert sum(n.op_type == "QuantizeLinear" for n in fast.graph.node) == 1  # one twin (the int8 one pruned)
            want = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
            got = ort.InferenceSession(fast.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)


def test_integer_matmul_to_float_leaves_what_it_cannot_read_exactly():
    """Weights scaled per row (axis 0), a MatMul without a constant bias, or one whose product is itself
    a graph output stay as they are."""
    from pni_ray.export.graph_passes import integer_matmul_to_float

    for model in (_qdq_matmul(np.array(3, np.uint8), axis=0), _qdq_matmul(np.array(3, np.uint8), bias=False),
                  _qdq_matmul(np.array(3, np.uint8), output_product=True)):
        before = model.SerializeToString()
        assert integer_matmul_to_float(model) == 0 and model.SerializeToString() == before


def test_other_providers_get_the_standard_graph(cpu_int8_export):
    """MatMulIntegerToFloat is a CPU kernel (CUDA has none): with another provider first the runtime
    loads the files' standard graphs."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime warns that CUDA is not available here, then uses the CPU
        model = load_exported(cpu_int8_export, threads=1, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert not [n for n in model.fused_graph().graph.node if n.domain == "com.microsoft"]
    assert [n for n in load_exported(cpu_int8_export, threads=1).fused_graph().graph.node if n.domain == "com.microsoft"]


def test_classifier_nodes_refuses_a_graph_without_its_classifier():
    """float_logits reads the MLP's last two nodes; any other ending is named, not rewritten blindly."""
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["logits"], name="relu")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])])
    with pytest.raises(ValueError, match="classifier"):
        quantize.classifier_nodes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _held_out_scores(export, bundle) -> np.ndarray:
    """The export's runtime scores of the bundle's held-out images, taken here independently of the exporter."""
    from pni_ray.bundle_manifest import calibration_images, read_manifest

    model = load_exported(export, threads=1)
    folder = Path(model.manifest["int8"]["calibration_dir"])
    names = calibration_images(read_manifest(bundle))
    return model.predict_images([model.geometry.load(folder / n) for n in names])[1].astype(np.float64)


def test_an_int8_export_takes_its_threshold_from_its_own_scores_of_the_held_out_images(cpu_int8_export, bundle_tiny):
    """The bundle's threshold bounds FP32 scores; INT8 graphs move every score, so the export applies the bundle's
    rule (mean + k std of the held-out images' scores) to its own scores of the same images. The maps' pixel
    statistics stay the bundle's (a refiner's input units)."""
    from pni_ray.bundle_manifest import read_manifest

    bundle = read_manifest(bundle_tiny)
    m = tables.read_manifest(cpu_int8_export)
    record = m["int8"]["threshold"]
    assert record["recalibrated"] and record["held_out_images"] == len(bundle["training"]["holdout_images"]) >= 2
    assert record["fp32_threshold"] == bundle["threshold"]
    scores = _held_out_scores(cpu_int8_export, bundle_tiny)
    k = bundle["config"]["scoring"]["threshold_sigmas"]
    assert m["threshold"] == pytest.approx(scores.mean() + k * scores.std(ddof=1), rel=1e-5)
    assert m["threshold"] != pytest.approx(bundle["threshold"], rel=1e-6)  # the INT8 graphs did move the scores
    assert m["normalisation"]["image_mean"] == pytest.approx(scores.mean(), rel=1e-5)
    for key in ("pixel_mean", "pixel_std"):
        assert m["normalisation"][key] == bundle["normalisation"][key]
    assert load_exported(cpu_int8_export, threads=1).threshold == m["threshold"]  # table and manifest agree


def test_an_int8_export_without_the_held_out_images_has_no_threshold(bundle_tiny, good_dir, tmp_path, caplog):
    """Not found in --calibration, or other images under their names (another category's train/good): no threshold
    at all rather than the FP32 one or one from the wrong images, and the warning says what to pass."""
    import logging
    import shutil

    from pni_ray.bundle_manifest import read_manifest

    held = read_manifest(bundle_tiny)["training"]["holdout_images"]
    others = sorted(p for p in good_dir.iterdir() if p.name not in held)
    without, renamed = tmp_path / "without", tmp_path / "renamed"
    without.mkdir()
    renamed.mkdir()
    for p in others:
        shutil.copy(p, without / p.name)
    for name, p in zip(held, others):  # good images, but not the held-out ones: a lower mean (memory-bank images)
        shutil.copy(p, renamed / name)
    for folder, why in ((without, "are not in --calibration"), (renamed, "are not those it held out")):
        out = tmp_path / f"e_{folder.name}"
        with caplog.at_level(logging.WARNING, logger="pni_ray.export.recalibrate"):
            export_bundle(bundle_tiny, out, ExportOptions(max_batch=4, int8=("mlp",), calibration=folder,
                                                          calibration_images=4))
        m = tables.read_manifest(out)
        assert m["threshold"] is None and not m["int8"]["threshold"]["recalibrated"]
        assert why in m["int8"]["threshold"]["reason"] and why in caplog.text and "train/good" in caplog.text
        assert load_exported(out, threads=1).threshold == float("inf")  # is_anomalous null
        caplog.clear()
