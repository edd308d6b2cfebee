"""The benchmark runs end to end on a tiny CPU configuration (a smoke test: no timing is asserted)."""

import json
import sys

import pytest

from conftest import launch_command, quiet_env, run_bounded

TINY_BENCH = ["--image-size", "32", "--width-divisor", "16", "--batch-size", "16", "--steps", "3", "--warmup", "1"]


@pytest.mark.slow
def test_bench_times_baseline_vgg_dist_and_loader(tmp_path):
    out = tmp_path / "bench.json"
    result = run_bounded([sys.executable, "-m", "vgg_dist.bench", *TINY_BENCH, "--baseline-workers", "0",
                          "--json", str(out), "--profile", str(tmp_path / "profile.txt"), "--aa", "trivial",
                          "--mixup", "0.2"], timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    for name in ("baseline", "vgg_dist", "loader"):
        assert report[name]["images_per_sec"] > 0, name
    assert report["vgg_dist"]["steps"] == 3 and report["baseline"]["steps"] == 3
    assert report["speedup"] == report["vgg_dist"]["images_per_sec"] / report["baseline"]["images_per_sec"]
    assert report["torch"] and report["device"] == "cpu" and report["precision"] == "no"
    assert report["vgg_dist"]["peak_memory_bytes"] > 0
    assert report["vgg_dist"]["compiled"] is False
    # The same step again with the augmentation asked for, and its share of that step.
    assert report["augmented"]["steps"] == 3 and report["augmented"]["flags"]["auto_augment"] == "trivial"
    step, alone = (1 / report[name]["images_per_sec"] for name in ("vgg_dist", "augmentation_only"))
    assert report["augmentation_share"] == alone / (step + alone) and report["augmentation_only"]["steps"] == 3
    assert "takes" in result.stdout and "of an augmented step" in result.stdout
    # Only the images the measurements take: the loader's 4 x 3 batches of 16.
    assert report["data"] == "synthetic 192x28x28 uint8"
    for line in ("baseline (chapter)", "vgg_dist loader only", "speedup vgg_dist / baseline", "peak memory"):
        assert line in result.stdout
    profile = (tmp_path / "profile.txt").read_text()
    assert "aten::convolution" in profile and "Self CPU time total" in profile


@pytest.mark.slow
def test_bench_under_two_processes(tmp_path):
    out = tmp_path / "bench.json"
    result = run_bounded(launch_command(2, "-m", "vgg_dist.bench", *TINY_BENCH, "--json", str(out)), timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["processes"] == 2 and "baseline" not in report and report["vgg_dist"]["images_per_sec"] > 0
    assert result.stdout.count("vgg_dist loader only") == 1


def test_bench_refuses_bad_sizes(tmp_path):
    result = run_bounded([sys.executable, "-m", "vgg_dist.bench", "--image-size", "50"], timeout=120)
    assert result.returncode == 2 and "--image-size must be a multiple of 32" in result.stderr


def test_bench_cuda_graphs_needs_a_long_enough_warmup_and_a_gpu():
    from conftest import run_main
    from vgg_dist import bench
    from vgg_dist.errors import UsageError
    with pytest.raises(UsageError, match="--cuda-graphs needs --warmup 4 or more"):
        bench.parse_args(["--cuda-graphs", "--warmup", "3"])
    code, stdout, stderr = run_main(bench.main, [*TINY_BENCH[:-1], "4", "--skip-baseline", "--cuda-graphs"])
    assert code == 2 and "--cuda-graphs needs a GPU and none is visible" in stderr and "images/s" not in stdout


@pytest.mark.slow
def test_compile_compiles_the_timed_model_and_a_second_run_reuses_the_cache(tmp_path):
    # Two separate processes sharing only the per-user cache directory (XDG_CACHE_HOME here).
    env = quiet_env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    reports = []
    for attempt in ("first", "second"):
        out = tmp_path / f"{attempt}.json"
        result = run_bounded([sys.executable, "-m", "vgg_dist.bench", *TINY_BENCH, "--skip-baseline", "--compile",
                              "--fused-pool", "--json", str(out)], timeout=600, env=env)
        assert result.returncode == 0, result.stderr
        reports.append(json.loads(out.read_text()))
    first, second = (report["vgg_dist"] for report in reports)
    assert first["compiled"] and second["compiled"] and reports[0]["fused_pool"]
    assert first["compile_cache"]["dir"] == str(tmp_path / "cache" / "vgg_dist" / "torchinductor")
    assert first["compile_cache"]["fx_graph_misses"] > 0 and first["compile_cache"]["fx_graph_hits"] == 0
    assert second["compile_cache"]["fx_graph_hits"] > 0 and second["compile_cache"]["fx_graph_misses"] == 0
    assert any((tmp_path / "cache" / "vgg_dist" / "torchinductor").iterdir())


@pytest.mark.slow
def test_bench_on_an_image_folder_compares_reading_it_with_torchvision(tmp_path):
    from test_datasets import image_folder
    folder, out = image_folder(tmp_path / "photos", per_class=40), tmp_path / "bench.json"
    for gif in folder.rglob("*.gif"):  # torchvision's ImageFolder takes no GIFs: time both on the same files
        gif.unlink()
    env = quiet_env(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    result = run_bounded([sys.executable, "-m", "vgg_dist.bench", *TINY_BENCH, "--steps", "2", "--data-dir",
                          str(folder), "--json", str(out)], timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    loading = json.loads(out.read_text())["folder_loader"]
    for key in ("torchvision_images_per_sec", "first_decode_images_per_sec", "cached_images_per_sec",
                "first_decode_one_worker_images_per_sec"):
        assert loading[key] > 0, key
    details = loading["details"]
    pictures = {split: len([path for path in (folder / split).rglob("*") if path.suffix in (".png", ".jpg")])
                for split in ("train", "test")}
    assert details["torchvision"]["images"] == details["cached"]["images"] == pictures["train"]  # the same files
    assert details["first_decode"]["images"] == pictures["train"] + pictures["test"] and "baseline" not in json.loads(out.read_text())
    assert "torchvision ImageFolder" in result.stdout and "cached epoch" in result.stdout
