"""`debiformer bench` and the loader benchmark on the CPU at tiny sizes."""

import io
import json
import shutil

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from debiformer.cli.flags import message as cli_message
from debiformer.cli.main import app
from debiformer.errors import UserError
from debiformer.tools import bench
from debiformer.tools.bench import BenchOptions
from debiformer.tools.common import CPU_MEMORY

RECORD_FIELDS = {
    "model",
    "impl",
    "mode",
    "resolution",
    "batch_size",
    "precision",
    "device",
    "params",
    "macs",
    "images_per_s",
    "peak_mem_mb",
    "keeps_freed_memory",
    "machine",
}
TINY = {"resolution": 32, "batch_size": 2, "warmup": 1, "iterations": 1}
NANO = {"models": ("debiformer_nano",), "device": "cpu", **TINY}


@pytest.mark.slow
def test_bench_command_writes_records_measured_in_fresh_processes(tmp_path):
    out = tmp_path / "results" / "bench.json"
    result = CliRunner().invoke(
        app,
        ["bench", "--models", "debiformer_nano", "--mode", "both", "--resolution", "32"]
        + ["--batch-size", "2", "--warmup", "1", "--iterations", "1", "--device", "cpu"]
        + ["--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())
    assert [(r["model"], r["impl"], r["mode"]) for r in records] == [
        ("debiformer_nano", "fast", "infer"),
        ("debiformer_nano", "fast", "train"),
    ]
    for record in records:
        assert set(record) >= RECORD_FIELDS
        assert (record["resolution"], record["batch_size"], record["precision"]) == (32, 2, "fp32")
        assert record["device"] == "cpu"
        assert record["params"] > 1e6 and record["macs"] > 1e6
        assert record["images_per_s"] > 0 and record["peak_mem_mb"] > 0
    infer, train = records
    assert train["peak_mem_mb"] > infer["peak_mem_mb"]
    assert "debiformer_nano" in result.output
    assert [path.name for path in out.parent.iterdir()] == ["bench.json"]  # no temporary left


def test_bench_runs_both_implementations_and_timm_models_in_one_table():
    options = BenchOptions(
        **NANO,
        compare=("test_resnet",),
        impls=("fast", "reference"),
        modes=("train",),
        fresh_process=False,
    )
    records = bench.run_bench(options)
    assert [(r["model"], r["impl"]) for r in records] == [
        ("debiformer_nano", "fast"),
        ("debiformer_nano", "reference"),
        ("test_resnet", "-"),
    ]
    assert records[0]["macs"] == records[1]["macs"] != records[2]["macs"]
    table = bench.bench_table(records)
    assert table.row_count == 3


def test_rounds_measure_the_table_row_after_row_and_report_each_rows_median(monkeypatch):
    measured = []
    speeds = {"debiformer_nano": iter([10.0, 30.0, 20.0]), "test_resnet": iter([5.0, 4.0, 6.0])}

    def measure_scripted(row, fresh_process):
        measured.append(row.model)
        images_per_s = next(speeds[row.model])
        ms_per_batch = 1000 * row.batch_size / images_per_s
        peak_mb = images_per_s  # a different peak each round
        result = {
            "ms_per_batch": ms_per_batch,
            "images_per_s": images_per_s,
            "peak_mem_mb": peak_mb,
        }
        return row, result, ""

    monkeypatch.setattr(bench, "measure_with_backoff", measure_scripted)
    options = BenchOptions(**NANO, compare=("test_resnet",), modes=("train",), rounds=3)
    progress = []
    nano, resnet = bench.run_bench(
        options, on_record=lambda record: progress.append((record["round"], record["model"]))
    )
    assert measured == ["debiformer_nano", "test_resnet"] * 3  # the table, three times over
    assert progress == [(n, model) for n in (1, 2, 3) for model in measured[:2]]  # none silent
    assert nano["images_per_s"] == 20.0 and nano["rounds_images_per_s"] == [10.0, 30.0, 20.0]
    assert resnet["images_per_s"] == 5.0 and resnet["peak_mem_mb"] == 6.0  # the largest peak


def test_bench_command_says_every_rounds_measurement_as_it_comes(monkeypatch):
    speeds = iter([30.0, 10.0])  # round 2's median is 30.0: the line says the round's own

    def measure_scripted(row, fresh_process):
        images_per_s = next(speeds)
        result = {"ms_per_batch": 1000 * row.batch_size / images_per_s, "peak_mem_mb": 1.0}
        return row, result | {"images_per_s": images_per_s}, ""

    monkeypatch.setattr(bench, "measure_with_backoff", measure_scripted)
    result = CliRunner().invoke(
        app,
        ["bench", "--models", "debiformer_nano", "--mode", "train", "--resolution", "32"]
        + ["--device", "cpu", "--rounds", "2"],
    )
    assert result.exit_code == 0, result.output
    assert "round 1/2, debiformer_nano fast train eager: 30.0 images/s" in result.output
    assert "round 2/2, debiformer_nano fast train eager: 10.0 images/s" in result.output


@pytest.mark.slow
def test_bench_times_onnxruntime_beside_eager_pytorch_in_one_run(exported_onnx, monkeypatch):
    exported = []

    def export_once(options):
        """The session's ONNX export, which holds what `options` ask for."""
        assert exported_onnx.same_options(options), options
        exported.append(options.out)
        shutil.copyfile(exported_onnx.path, options.out)
        return exported_onnx.result

    monkeypatch.setattr(bench, "export_model", export_once)
    options = BenchOptions(
        **{**NANO, "resolution": 33},
        impls=("fast", "reference"),
        runtimes=("eager", "onnxruntime"),
        fresh_process=False,
    )
    records = bench.run_bench(options)
    assert len(exported) == 1  # once per model
    assert [(r["impl"], r["runtime"]) for r in records] == [
        ("fast", "eager"),
        ("fast", "onnxruntime"),
        ("reference", "eager"),
    ]
    eager, onnxruntime, _ = records
    assert (onnxruntime["params"], onnxruntime["macs"]) == (eager["params"], eager["macs"])
    assert onnxruntime["images_per_s"] > 0 and onnxruntime["compile"] is False
    text = _render(bench.bench_table(records))
    assert "runtime" in text and "onnxruntime" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_macs_match_the_published_count_of_debiformer_tiny():
    model = bench.build_benchmark_model("debiformer_tiny", 224)
    assert bench.count_macs(model, 224) == pytest.approx(2.636e9, rel=1e-3)


def test_out_of_memory_halves_the_batch_and_says_so(monkeypatch):
    make_step = bench.make_step
    tried = []

    def fits_two(model, mode, images, labels, precision):
        tried.append(images.shape[0])
        if images.shape[0] > 2:

            def out_of_memory():
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

            return out_of_memory
        return make_step(model, mode, images, labels, precision)

    monkeypatch.setattr(bench, "make_step", fits_two)
    (record,) = bench.run_bench(BenchOptions(**{**NANO, "batch_size": 8}, fresh_process=False))
    assert tried == [8, 4, 2]
    assert record["batch_size"] == 2
    assert "out of memory at batch 8" in record["note"]
    assert "out of memory at batch 4" in record["note"]
    assert "ran at batch 2" in record["note"]
    text = _render(bench.bench_table([record]))
    assert "2*" in text and record["note"] in " ".join(text.split())


def test_out_of_memory_at_batch_one_is_a_user_error(monkeypatch):
    def never_fits(model, mode, images, labels, precision):
        def out_of_memory():
            raise torch.OutOfMemoryError("simulated")

        return out_of_memory

    monkeypatch.setattr(bench, "make_step", never_fits)
    with pytest.raises(UserError, match="out of memory"):
        bench.run_bench(BenchOptions(**NANO, fresh_process=False))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"models": ["debiformer_huge"]}, "models: unknown model 'debiformer_huge'"),
        ({"compare": ["no_such_timm_model"]}, "compare: unknown timm model"),
        ({"impls": ["faster"]}, "impls: unknown implementation 'faster'"),
        ({"modes": ["serve"]}, "modes: unknown mode 'serve'"),
        ({"precision": "fp16"}, "fp16 needs a CUDA device"),
        ({"precision": "int8"}, "precision: unknown precision 'int8'"),
        ({"device": "tpu"}, "device: unknown device 'tpu'"),
        ({"grad_checkpointing": (0, 3)}, r"grad_checkpointing takes stages 1-4, got \[0, 3\]"),
        ({"grad_checkpointing": (5,)}, "grad_checkpointing takes stages 1-4"),
        ({"iterations": 0}, "iterations must be at least 1, got 0"),
        ({"rounds": 0}, "rounds must be at least 1, got 0"),
        ({"warmup": -1}, "warmup must be at least 0, got -1"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
        ({"resolution": 0}, "resolution must be at least 32, got 0"),
        ({"models": (), "compare": ()}, "models: nothing to measure"),
        ({"impls": ()}, "impls: give at least one"),
        ({"runtimes": ["tensorrt"]}, "runtimes: unknown runtime 'tensorrt'"),
        ({"runtimes": ()}, "runtimes: give at least one"),
        ({"runtimes": ["onnxruntime"], "modes": ["train"]}, "measures inference only"),
        ({"runtimes": ["onnxruntime"], "precision": "bf16"}, "runs fp32 on the CPU"),
        ({"runtimes": ["onnxruntime"], "impls": ["reference"]}, "with impls=fast"),
        ({"runtimes": ["cudagraphs"]}, "runtimes=cudagraphs replays CUDA graphs: use device=cuda"),
    ],
)
def test_bench_options_reject_bad_input(options, message):
    with pytest.raises(UserError, match=message):
        BenchOptions(**{**NANO, **options})


def test_bench_options_are_frozen_tuples():
    options = BenchOptions(models=["debiformer_nano"], impls=["fast"], device="cpu")
    assert options.models == ("debiformer_nano",) and options.impls == ("fast",)
    with pytest.raises(AttributeError):
        options.batch_size = 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_user_error():
    with pytest.raises(UserError, match="no CUDA device"):
        BenchOptions(**{**NANO, "device": "cuda"})


@pytest.fixture
def no_work(monkeypatch):
    """Fails a test if the benchmark starts."""

    def started(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench, "run_bench", started)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--iterations", "0"], "--iterations must be at least 1, got 0"),
        (["--rounds", "0"], "--rounds must be at least 1, got 0"),
        (["--warmup", "-1"], "--warmup must be at least 0, got -1"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--resolution", "0"], "--resolution must be at least 32, got 0"),
        (["--mode", "serve"], "--mode: unknown mode 'serve'; choose infer, train or both"),
        (["--grad-checkpointing", "1,5"], "--grad-checkpointing takes stages 1-4, got [1, 5]"),
        (["--models", "debiformer_nano,nope"], "--models: unknown model 'nope'"),
        (["--compile", "--runtime", "eager"], "--compile is --runtime compile: give one of them"),
        (["--runtime", "onnxruntime", "--mode", "both"], "measures inference only"),
        (["--models", ""], "--models: nothing to measure; name a DeBiFormer variant or --compare"),
        (
            ["--runtime", "eager,cudagraphs"],
            "--runtime cudagraphs replays CUDA graphs: use --device",
        ),
    ],
)
def test_bench_command_checks_options_before_any_work(no_work, flags, message):
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", *flags])
    assert isinstance(result.exception, UserError)
    assert message in cli_message(result.exception, "bench")
    assert "\n" not in str(result.exception)


@pytest.mark.parametrize(
    ("flags", "models"),
    [
        ([], bench.DEFAULT_MODELS),
        (["--models", ""], ()),
        (["--models", "debiformer_nano"], ("debiformer_nano",)),
    ],
)
def test_the_models_flag_names_the_variants_default_or_none(monkeypatch, flags, models):
    measured = []
    monkeypatch.setattr(bench, "run_bench", lambda options, on_record: measured.append(options))
    monkeypatch.setattr(bench, "bench_table", lambda records: "")
    flags = ["--device", "cpu", "--compare", "convnext_tiny", *flags]
    result = CliRunner().invoke(app, ["bench", *flags])
    assert result.exit_code == 0, result.output
    assert (measured[0].models, measured[0].compare) == (models, ("convnext_tiny",))


def test_bench_command_checks_the_json_path_before_any_work(no_work, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for path, problem in ((blocker / "bench.json", "cannot create"), (tmp_path, "is a directory")):
        result = CliRunner().invoke(
            app, ["bench", "--models", "debiformer_nano", "--device", "cpu", "--json", str(path)]
        )
        assert isinstance(result.exception, UserError)
        assert str(result.exception).startswith("--json ") and problem in str(result.exception)


def test_bad_option_is_a_one_line_error_with_exit_code_2(no_work, run_main):
    code, out, err = run_main("bench", "--iterations", "0")
    assert code == 2
    assert err.strip() == "error: --iterations must be at least 1, got 0"


def _render(table, width=80) -> str:
    """`table` as printed to a pipe on a console `width` columns wide."""
    output = io.StringIO()
    Console(file=output, width=width, force_terminal=False, color_system=None).print(table)
    return output.getvalue()


def _record(model, impl, note=""):
    return {
        "model": model,
        "impl": impl,
        "mode": "train",
        "resolution": 224,
        "batch_size": 32,
        "precision": "fp32",
        "device": "cpu",
        "grad_checkpointing": [1, 3],
        "params": 28_288_354,
        "macs": 4_491_000_000,
        "images_per_s": 1234.56,
        "ms_per_batch": 12345.67,
        "peak_mem_mb": 12345.6,
        "peak_mem": CPU_MEMORY,
        "note": note,
        "machine": {
            "cpu": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
            "cpu_capability": "AVX512",
            "amx": True,
            "threads": 2,
            "torch": "2.14.1",
        },
    }


def test_bench_table_fits_80_columns_without_cutting_anything():
    records = [
        _record("debiformer_small", "reference"),
        _record("swin_tiny_patch4_window7_224", "-", "out of memory at batch 64: ran at batch 32"),
    ]
    text = _render(bench.bench_table(records))
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for header in ("model", "impl", "mode", "batch", "params M", "GMACs", "img/s", "ms", "MB"):
        assert header in text
    for cell in ("debiformer_small", "reference", "28.29", "4.491", "1235", "12346", "32*"):
        assert cell in text
    assert "swin_tiny_patch4_window7_" in text  # a long name wraps, whole
    assert "CPU peak RSS rise" in text  # the caption says what MB is
    caption = " ".join(text.split())
    assert "On Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (AVX512, AMX), 2 threads" in caption
    assert "torch 2.14.1" in caption


def test_loader_bench_checks_its_settings_and_json_path_before_any_work(tmp_path):
    from debiformer import data
    from debiformer.tools.loader_bench import bench_loaders

    missing = str(tmp_path / "no_such_folder")
    for bench_loaders_of in (bench_loaders, data.bench_loaders):  # also in the data package
        with pytest.raises(UserError, match="must be at least 1, got 0"):
            bench_loaders_of(missing, repeats=0)
        with pytest.raises(UserError, match="is a directory"):
            bench_loaders_of(missing, json_path=str(tmp_path))


def test_a_timm_model_built_for_one_input_size_is_built_for_the_benchmarks():
    """Swin-T is built for 224² (timm's `fixed_input_size`); at another resolution it is built for
    that one, as `bench --resolution 64 --compare swin_tiny_patch4_window7_224` needs."""
    model = bench.build_benchmark_model("swin_tiny_patch4_window7_224", 64).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_a_timm_model_of_one_input_size_only_is_a_one_line_error_before_any_work(monkeypatch):
    def without_img_size(name, pretrained, **kwargs):
        if "img_size" in kwargs:
            raise TypeError("__init__() got an unexpected keyword argument 'img_size'")

    monkeypatch.setattr(bench.timm, "create_model", without_img_size)
    bench.BenchOptions(models=(), compare=("swin_tiny_patch4_window7_224",), resolution=224)
    with pytest.raises(UserError, match=r"takes 224² images only .*measure it at that resolution"):
        bench.BenchOptions(models=(), compare=("swin_tiny_patch4_window7_224",), resolution=64)
