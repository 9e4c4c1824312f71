"""The bundled demo: the trained digit DiT and classifier, sampling, metrics and the ``toca-fx`` CLI."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
pytest.importorskip("sklearn")

import toca_fx  # noqa: E402
from toca_fx import cli, demo  # noqa: E402
from toca_fx.demo import quality  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return demo.load_model()


def test_weights_ship_in_the_package_and_load_with_from_pretrained(model):
    from diffusers import DiTTransformer2DModel

    files = sorted(p for p in demo.WEIGHTS.rglob("*") if p.is_file())
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert (demo.WEIGHTS / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert isinstance(model, DiTTransformer2DModel) and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.in_channels == 1 and model.config.num_embeds_ada_norm == demo.NUM_CLASSES
    # The same code a user would run on their own save_pretrained directory.
    again = DiTTransformer2DModel.from_pretrained(demo.WEIGHTS / "transformer", low_cpu_mem_usage=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    clf = demo.load_classifier()
    assert clf.features(torch.zeros(2, 1, 16, 16)).shape == (2, clf.config["feature_dim"])


def test_canvas_variant_data_classifier_and_sampling():
    """``train.py --canvas 32 --patch 4`` (the background experiment in BENCHMARKS.md): digits centred on the
    canvas, the real set shifted as in training, a classifier for the size, samples at the model's size."""
    from diffusers import DiTTransformer2DModel

    from toca_fx.demo.model import dit_config, load_digits_tensor, max_shift

    x16, y = load_digits_tensor()
    x32, y32 = load_digits_tensor(32)
    assert x32.shape == (1797, 1, 32, 32) and torch.equal(y, y32)
    assert torch.equal(x32[..., 8:24, 8:24], x16)                         # the same digits, centred
    assert (x32[..., :8, :] == -1).all() and (x32[..., :, 24:] == -1).all()
    assert max_shift(16) == 1 and max_shift(32) == 4
    real, _ = demo.real_digits(32)
    assert real.shape == (1797, 1, 32, 32) and not torch.equal(real, (x32 + 1) / 2)   # shifted
    assert torch.equal(demo.real_digits()[0], (x16 + 1) / 2)             # the bundled model's set: as is
    clf = demo.DigitClassifier(image_size=32)
    assert clf.features(torch.zeros(2, 1, 32, 32)).shape == (2, clf.config["feature_dim"])
    torch.manual_seed(0)
    tiny = DiTTransformer2DModel(**dict(dit_config(32, 4), num_layers=1, num_attention_heads=2,
                                        attention_head_dim=8)).eval()
    assert demo.sample(tiny, [1, 2], num_steps=2).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="smaller than"):
        load_digits_tensor(8)


def test_sample_is_deterministic_for_a_seed(model):
    a = demo.sample(model, [3, 7], num_steps=4, seed=5)
    b = demo.sample(model, torch.tensor([3, 7]), num_steps=4, seed=5)
    c = demo.sample(model, [3, 7], num_steps=4, seed=6)
    assert a.shape == (2, 1, 16, 16) and a.dtype == torch.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="class indices"):
        demo.sample(model, [10], num_steps=2)


def test_sample_runs_one_toca_generation_per_call(model):
    toca_fx.transform(model, "toca-digits")
    try:
        demo.sample(model, [1, 2], num_steps=6, seed=0)
        first = toca_fx.stats(model).calls
        demo.sample(model, [1, 2], num_steps=6, seed=0)
        second = toca_fx.stats(model).calls
    finally:
        toca_fx.remove(model)
    assert first.get("fresh", 0) >= 1 and first.get("partial", 0) >= 1
    # Each call is its own generation: the second doubles every count (it starts fresh again).
    assert second == {k: 2 * v for k, v in first.items()}


def test_metrics_on_known_inputs():
    real, labels = demo.real_digits()
    x = real[:40]
    m = demo.metrics(x, x, labels[:40])
    assert m["psnr"] == pytest.approx(100.0) and m["ssim"] == pytest.approx(1.0)
    assert m["class_agreement"] >= 0.95     # the classifier on real digits
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    m1, m2 = (demo.metrics((x + s * noise).clamp(0, 1), x) for s in (0.1, 0.2))
    assert 15 < m2["psnr"] < m1["psnr"] < 25 and m2["ssim"] < m1["ssim"] < 0.95
    # Frechet distance: zero for identical sets, symmetric, and larger for a shifted set.
    f = torch.randn(200, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = torch.randn(200, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.5 + 0.5
    assert quality.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-8)
    assert quality.frechet_distance(f, g) == pytest.approx(quality.frechet_distance(g, f), rel=1e-6)
    assert quality.frechet_distance(f, g) > 1.0


def test_cli_demo_quick(tmp_path, capsys):
    """``toca-fx demo --quick`` (CI's short mode: 25 DDIM steps, 20 images): the issue's bars that hold on the
    bundled model, measured on the demo's own JSON. (ToCa vs FORA at the same FLOPs ratio is reported, not
    asserted: on this model FORA is ahead on PSNR, see BENCHMARKS.md.)"""
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    assert (tmp_path / "demo_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    base, toca, *foras = report["results"]
    assert [base["name"], toca["name"]] == ["uncached", "toca-digits"]
    assert foras and all(r["name"].startswith("fora N=") for r in foras)
    assert base["class_agreement"] >= 0.9
    assert toca["flops_ratio"] >= 2.0
    assert toca["psnr"] >= 25.0 and toca["ssim"] >= 0.9
    assert toca["class_agreement"] >= 0.9
    # FORA's runs bracket ToCa's FLOPs ratio, so its metrics at that ratio are interpolated, not extrapolated.
    ratios = sorted(r["flops_ratio"] for r in foras)
    assert ratios[0] <= toca["flops_ratio"] <= ratios[-1]
    assert report["fora_at_toca_ratio"]["method"].startswith("linear")
    checks = report["checks"]
    assert all(checks[k] for k in ("uncached class agreement >= 0.9", "ToCa FLOPs ratio >= 2", "ToCa PSNR >= 25 dB",
                                    "ToCa SSIM >= 0.9"))
    # toca_fx's own FLOPs count agrees with FlopCounterMode on the whole loop (blocks dominate).
    assert toca["stats_flops_ratio"] == pytest.approx(toca["flops_ratio"], rel=0.1)
    out = capsys.readouterr().out
    assert "toca-digits" in out and "FORA at ToCa's FLOPs ratio" in out
    # The check ToCa fails here is printed unticked, with where to read why (and only then).
    psnr_check = "ToCa PSNR > FORA's at the same FLOPs ratio"
    assert checks[psnr_check] == (toca["psnr"] > report["fora_at_toca_ratio"]["psnr"])
    assert (f"[ ] {psnr_check}" in out) == ("ToCa trails FORA on PSNR on this model" in out) == (not checks[psnr_check])
    # the best forecasting preset, from the same noise, with its own checks computed from its row
    fc = report["forecast"]
    assert fc["name"] == "forecast-n4" and "forecast-n4" in out and fc["psnr"] >= 25.0
    assert checks["forecast-n4 FLOPs ratio >= 3"] == (fc["flops_ratio"] >= 3.0)
    assert checks["forecast-n4 PSNR > ToCa's and > FORA's at ToCa's FLOPs ratio"] == (
        fc["psnr"] > toca["psnr"] and fc["psnr"] > report["fora_at_toca_ratio"]["psnr"])


@pytest.mark.parametrize("argv, message", [
    (["demo", "--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["demo", "--steps", "0"], "--steps must be >= 1"),
    (["explain", "/no/such/dir"], "no such directory"),
    (["explain", "UNet2DModel", "--config", json.dumps(dict(
        sample_size=8, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8,
        down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"]))],
     "UNet2DModel"),
    (["explain", "DiTTransformer2DModel", "--config", "{not json"], "not valid JSON"),
    (["demo", "--device", "cuda:7"] if not torch.cuda.is_available() else ["demo", "--device", "nodevice"], "--device"),
])
def test_cli_user_mistakes_are_one_line_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("toca-fx: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_bench_loads_the_benchmark_script(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "usage: toca-fx bench" in capsys.readouterr().out


def test_bench_merge_joins_shards_and_refuses_different_settings():
    """``bench.py --merge``: one report from ``--only`` shards, each keeping its own uncached wall ratios."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(cli.__file__).resolve().parents[1] / "benchmarks" / "bench.py"
    spec = importlib.util.spec_from_file_location("toca_fx_bench_test", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)

    def shard(only, names, first):
        metrics = dict(flops_ratio=1.0, psnr=None, ssim=1.0, frechet_distance=80.0, class_agreement=1.0)
        rows = [dict(metrics, name="uncached", family="uncached", wall_ratio=1.0)]
        rows += [dict(metrics, name=n, family="toca_fx FORA", wall_ratio=2.0, psnr=40.0) for n in names]
        return dict(settings=dict(steps=50, images=100, seed=0, guidance=1.5, repeats=1, threads=1, only=only),
                    results=rows, skipped=[dict(name="x", family="f", reason="y")], seconds=first,
                    uncached_wall_s=dict(first=[first], last=[first - 1], drift=-1 / first))

    merged = bench.merge([shard("a", ["fora N=2"], 10.0), shard("b", ["fora N=3", "fora N=4"], 20.0)])
    assert [r["name"] for r in merged["results"]] == ["uncached", "fora N=2", "fora N=3", "fora N=4"]
    assert merged["settings"]["only"] == ["a", "b"] and merged["skipped"] == [dict(name="x", family="f", reason="y")]
    assert merged["uncached_wall_s"]["first"] == [10.0, 20.0] and len(merged["uncached_wall_s"]["shards"]) == 2
    assert "Run as 2 shards" in bench.markdown(dict(merged, machine=dict(cpu="cpu", cores=2, torch="t", diffusers="d"),
                                                    fd_real_digits=dict(n=100, draws=10, mean=1, min=0, max=2)))
    other = shard("c", ["fora N=5"], 5.0)
    other["settings"]["steps"] = 25
    with pytest.raises(SystemExit, match="differ in settings"):
        bench.merge([shard("a", [], 1.0), other])
    elsewhere = shard("d", ["fora N=5"], 5.0)
    elsewhere["settings"]["weights"] = "/tmp/another-model"
    with pytest.raises(SystemExit, match="differ in settings"):
        bench.merge([shard("a", [], 1.0), elsewhere])
