"""The Cog predictor: input parity with the schema, the generated OpenAPI file, and the real
Cog HTTP server (coglet) on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
import threading
import time
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from PIL import Image

from handler.cog_predictor import COG_SDXL_SCHEDULERS
from handler.schedulers import SCHEDULER_NAMES, canonical_scheduler
from handler.schema import Job
from tests.servers import REPO, Server, free_port

# Form inputs that stand for part of a schema field: LoRAs as a "name:scale, ..." string,
# the hires fix's object as two inputs, the safety checker as an API-only opt-out, and
# cog-sdxl's refine switch.
COG_ONLY = {
    "loras",
    "hires_scale",
    "hires_strength",
    "disable_safety_checker",
    "schedule_type",
    "refine",
}
# Form inputs under cog-sdxl's names (Replicate's usual ones), and the schema field of each.
COG_SDXL_NAMES = {
    "num_inference_steps": "steps",
    "num_outputs": "num_images",
    "prompt_strength": "strength",
    "refine_steps": "refiner_inference_steps",
}
# Schema fields not in the form, and why.
NOT_IN_FORM = {
    "destination": "Replicate hosts the output files itself",
    "sidecar": "needs a bucket; Replicate has none",
    "hires": "in the form as hires_scale and hires_strength",
    "safety_checker": "in the form as disable_safety_checker (API only)",
    "eta": "DDIM's alone: an A1111 option for A1111's clients, on the RunPod side",
    **{
        field: f"in the form as {name}, as cog-sdxl names it"
        for name, field in COG_SDXL_NAMES.items()
    },
}


def declared_inputs() -> dict:
    """The predictor's Input(...) declarations, with their bounds exactly as written."""
    import inspect

    from handler.cog_predictor import Predictor

    return {n: p.default for n, p in inspect.signature(Predictor.run).parameters.items()}


def cog_inputs():
    from cog._inspector import create_predictor

    return create_predictor("handler.cog_predictor", "Predictor").inputs


def bounds(field) -> tuple:
    ge = le = None
    for rule in field.metadata:
        ge = getattr(rule, "ge", ge)
        le = getattr(rule, "le", le)
    return ge, le


def test_every_cog_input_matches_the_schema():
    from handler.schema import HiresFix

    declared = declared_inputs()
    hires = {"hires_scale": "scale", "hires_strength": "strength"}
    for name, cog_field in cog_inputs().items():
        assert cog_field.description, f"{name} has no description"
        if name in hires:
            field = HiresFix.model_fields[hires[name]]
            assert (declared[name].ge, declared[name].le) == bounds(field), name
            if name == "hires_strength":
                assert cog_field.default == field.default
            continue
        if name in COG_ONLY:
            continue
        field_name = COG_SDXL_NAMES.get(name, name)
        assert field_name in Job.model_fields, f"{name} is not a schema field"
        field = Job.model_fields[field_name]
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        if name == "high_noise_frac":  # cog-sdxl's 0.8, used with refine=expert_ensemble_refiner
            default = 0.8
        assert cog_field.default == default, name
        assert (declared[name].ge, declared[name].le) == bounds(field), name  # exactly
        if name == "scheduler":
            assert tuple(cog_field.choices) == SCHEDULER_NAMES + COG_SDXL_SCHEDULERS
            assert all(canonical_scheduler(choice) for choice in COG_SDXL_SCHEDULERS)
        elif name == "output_format":  # and jpg, Replicate's other models' name for jpeg
            assert tuple(cog_field.choices) == ("png", "jpeg", "jpg", "webp")
            assert {*typing.get_args(field.annotation), "jpg"} == set(cog_field.choices)
        elif typing.get_origin(field.annotation) is typing.Literal:
            assert tuple(cog_field.choices) == typing.get_args(field.annotation), name
        else:
            assert not cog_field.choices, name


def _as_cog_reads_it(node, source: str, scope: dict):
    """What Cog's static schema parser (the CLI's tree-sitter reader, which `cog build` runs
    instead of the predictor) makes of an `Input()` argument: a literal as its source text
    (a string is the text between its quotes, escapes and all), or a module-level literal's
    name. None where it gives up; it then drops a description, defaults to None, or fails the
    build over choices."""
    import ast
    import tokenize

    if isinstance(node, ast.Name):
        return scope.get(node.id)
    text = ast.get_source_segment(source, node)
    if isinstance(node, ast.List):
        items = [_as_cog_reads_it(item, source, scope) for item in node.elts]
        return None if any(item is None for item in items) else ("list", *items)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.string]
        if len(tokens) != 1 or text[0] not in "\"'":  # "a" "b" and ("a") are not read
            return None
        return ("str", text[1:-1])
    if isinstance(node, ast.Constant | ast.UnaryOp):
        return ("literal", text)
    return None


def test_every_input_reads_the_same_to_cogs_static_parser():
    """`cog build` reads the form from this file's source. Each description, default, bound
    and choice must be a literal that it reads as Python does."""
    import ast

    source = (REPO / "handler" / "cog_predictor.py").read_text()
    module = ast.parse(source)
    scope = {}
    for statement in module.body:
        if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name):
            value = _as_cog_reads_it(statement.value, source, {})
            if value is not None:
                scope[statement.targets[0].id] = value
    (run,) = [n for n in ast.walk(module) if isinstance(n, ast.FunctionDef) and n.name == "run"]
    read = 0
    for default in run.args.defaults:
        assert isinstance(default, ast.Call) and default.func.id == "Input"
        for keyword in default.keywords:
            written = ast.get_source_segment(source, keyword).split("=", 1)[1].lstrip()
            assert not written.startswith("("), keyword.arg  # a parenthesized value is not read
            seen = _as_cog_reads_it(keyword.value, source, scope)
            assert seen is not None, (keyword.arg, ast.get_source_segment(source, keyword.value))
            if seen[0] == "str" and isinstance(keyword.value, ast.Constant):
                # no escapes: the text between the quotes is the value
                assert seen[1] == keyword.value.value, keyword.arg
            read += 1
    assert read > 60


def test_every_schema_field_is_in_the_form_or_left_out_for_a_reason():
    inputs = set(cog_inputs())
    missing = [n for n in Job.model_fields if n not in inputs and n not in NOT_IN_FORM]
    assert not missing, f"schema fields missing from the Cog form: {missing}"


def test_openapi_bounds_are_exact_and_optional_inputs_are_nullable():
    from scripts.cog_schema import build_schema

    properties = build_schema()["components"]["schemas"]["Input"]["properties"]
    assert properties["seed"]["maximum"] == 2**64 - 1 and properties["seed"]["nullable"]
    assert (
        properties["num_inference_steps"]["maximum"] == 150
        and "nullable" not in properties["num_inference_steps"]
    )


def test_image_and_mask_are_cog_paths():
    for name in ("image", "mask"):
        assert cog_inputs()[name].type.json_type() == {"type": "string", "format": "uri"}


def test_committed_openapi_schema_is_current():
    from scripts.cog_schema import SCHEMA_PATH, build_schema

    assert json.loads(SCHEMA_PATH.read_text()) == json.loads(json.dumps(build_schema())), (
        "run: python scripts/cog_schema.py"
    )


def test_the_local_cog_predict_reads_values_by_the_inputs_type(tmp_path):
    """scripts/cog_predict.py, as the cog CLI: `prompt=1984` is text, numbers and booleans by
    the schema, `@file` a data URL, and a value of the wrong type stops it before any server."""
    from scripts.cog_predict import input_types, parse_inputs

    image = tmp_path / "in.png"
    image.write_bytes(sink_png())
    pairs = ["prompt=1984", "seed=5", "guidance_scale=7", "strip_metadata=true", f"image=@{image}"]
    inputs = parse_inputs([*pairs, "scheduler=Euler a"], input_types())
    assert inputs["prompt"] == "1984" and inputs["seed"] == 5 and inputs["guidance_scale"] == 7.0
    assert inputs["strip_metadata"] is True and inputs["scheduler"] == "Euler a"
    assert inputs["image"].startswith("data:image/png;base64,")
    with pytest.raises(SystemExit, match="-i seed: '' is not an integer"):
        parse_inputs(["seed="], input_types())


def test_lora_string_parsing():
    from handler.cog_predictor import parse_lora_list

    assert parse_lora_list("a:0.5, styles/b , c:-1") == [
        {"name": "a", "scale": 0.5},
        {"name": "styles/b", "scale": 1.0},
        {"name": "c", "scale": -1.0},
    ]
    assert parse_lora_list("") == []
    from handler.errors import InvalidInput

    with pytest.raises(InvalidInput) as info:
        parse_lora_list("ink:strong")
    assert info.value.field == "loras"


def predictor_on(engine) -> tuple:
    """A predictor (without its setup) running on `engine`, and a small job's form inputs."""
    from handler.cog_predictor import Predictor

    runner = Predictor()
    runner.engine = engine
    runner.start_job_thread()
    inputs = {name: getattr(value, "default", None) for name, value in declared_inputs().items()}
    inputs.pop("self")
    inputs.update(prompt="a cube", width=64, height=64)
    return runner, inputs


def test_a_prediction_that_may_poison_the_gpu_fails_the_health_check_after_it():
    from handler.errors import InternalError, InvalidInput

    class FailingEngine:
        error: Exception

        def run(self, job, progress=None, cancelled=None, job_id="local"):
            raise self.error

    engine = FailingEngine()
    runner, inputs = predictor_on(engine)
    engine.error = InvalidInput("bad", field="width")
    with pytest.raises(InvalidInput):
        runner.run(**inputs)
    assert runner.healthcheck() is True  # the client's mistake: the container is fine
    engine.error = InternalError("a CUDA error left the GPU unusable", refresh_worker=True)
    with pytest.raises(InternalError):
        runner.run(**inputs)
    assert runner.healthcheck() is False


def test_coglets_cancel_never_lands_inside_the_engines_cleanup():
    """coglet cancels by raising CancelationException in the thread running run(), wherever it
    is (PyThreadState_SetAsyncExc); the engine's cleanup must still finish."""
    import ctypes

    from coglet import CancelationException

    from handler.errors import Cancelled

    class SlowCleanupEngine:
        cleaning, cleaned = threading.Event(), False

        def run(self, job, progress=None, cancelled=None, job_id="local"):
            try:
                for _ in range(300):  # denoising steps, checking for a cancel
                    if cancelled():
                        raise Cancelled("the job was cancelled")
                    time.sleep(0.01)
            finally:
                self.cleaning.set()
                for _ in range(30):  # undoing the job's LoRAs, embeddings, scheduler
                    time.sleep(0.01)
                self.cleaned = True

    engine = SlowCleanupEngine()
    runner, inputs = predictor_on(engine)
    raised = []

    def predict() -> None:
        try:
            runner.run(**inputs)
        except BaseException as error:
            raised.append(error)

    caller = threading.Thread(target=predict)
    caller.start()
    cancel = ctypes.py_object(CancelationException)
    time.sleep(0.2)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(caller.ident), cancel)  # mid-job
    assert engine.cleaning.wait(5)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(caller.ident), cancel)  # cleanup
    caller.join(10)
    assert engine.cleaned and [type(e) for e in raised] == [CancelationException]


def test_a_cancel_at_any_line_of_the_hand_off_leaves_no_job_running():
    """coglet's cancel can land on any line of run(), also while the job is handed over: run()
    must never wait forever, and never return while the job goes on (the next prediction would
    wait behind it, or run beside it). The cancel is raised here at each line in turn, from a
    trace function, in every frame below run()'s hand-off."""
    import sys

    from coglet import CancelationException

    from handler.errors import Cancelled

    class CountingEngine:
        running = 0

        def run(self, job, progress=None, cancelled=None, job_id="local"):
            self.running += 1
            try:
                for _ in range(500):
                    if cancelled():
                        raise Cancelled("the job was cancelled")
                    time.sleep(0.001)
            finally:
                self.running -= 1

    engine = CountingEngine()
    runner, inputs = predictor_on(engine)

    def predict(line: int, landed: list) -> None:
        counted, inside = 0, False

        def trace(frame, event, arg):
            nonlocal counted, inside
            inside = inside or frame.f_code.co_name == "_run_shielded"
            if inside and event == "line":
                counted += 1
                if counted == line:
                    landed.append(frame.f_code.co_name)
                    raise CancelationException()
            return trace

        sys.settrace(trace)
        try:
            runner.run(**inputs)
        except BaseException:  # noqa: S110 - the cancel, wherever it landed
            pass
        finally:
            sys.settrace(None)

    places = set()
    for line in range(1, 120):
        landed: list[str] = []
        caller = threading.Thread(target=predict, args=(line, landed))
        caller.start()
        caller.join(10)
        assert not caller.is_alive(), f"run() waits forever (cancel at line {line})"
        assert engine.running == 0, f"run() returned while its job goes on (line {line})"
        places.update(landed)
    assert {"_run_shielded", "__init__", "is_set"} <= places  # and the lines between


def test_the_cog_server_reports_the_predictors_health_check(demo_volume, tmp_path):
    """coglet calls the predictor's healthcheck(): UNHEALTHY once it returns False."""
    module = tmp_path / "poisoned.py"
    module.write_text(
        "from handler.cog_predictor import Predictor as Base\n\n\n"
        "class Predictor(Base):\n"
        "    def setup(self):\n"
        "        super().setup()\n"
        "        self.gpu_unusable = True  # as after a CUDA error\n"
    )
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    server = Server(
        [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
        env={
            "COG_PREDICT_TYPE_STUB": f"{module}:Predictor",
            "PORT": str(port),
            "MODELS_DIR": str(demo_volume),
            "DEFAULT_CHECKPOINT": "demo-sd15",
            "DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        },
        log_path=tmp_path / "cog.log",
    )
    url = f"http://127.0.0.1:{port}/health-check"
    try:
        server.wait_until(lambda: requests.get(url, timeout=2).json()["status"] != "STARTING")
        assert requests.get(url, timeout=5).json()["status"] == "UNHEALTHY"
    finally:
        server.stop()


def test_setup_starts_reading_the_checkpoint_before_torch_is_imported(demo_volume):
    # Cog imports the predictor, then calls setup(): the checkpoint's disk read can only overlap
    # the torch and diffusers imports if the module itself imports neither.
    import subprocess

    code = """
import json, sys
import handler.cog_predictor as predictor
calls = []
original = predictor.prefetch_default_checkpoint
def recording():
    calls.append("torch" in sys.modules or "diffusers" in sys.modules)
    return original()
predictor.prefetch_default_checkpoint = recording
runner = predictor.Predictor()
runner.setup()
print(json.dumps({"calls": calls, "checkpoints_loaded": len(runner.engine.cache)}))
"""
    env = {**os.environ, "MODELS_DIR": str(demo_volume), "DEFAULT_CHECKPOINT": "demo-sd15"}
    env.update(DEVICE="cpu", HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["calls"] == [False]  # once, with neither library imported yet
    assert report["checkpoints_loaded"] == 1  # DEFAULT_CHECKPOINT preloaded by setup


def test_cog_yaml_points_at_the_predictor_and_the_shared_requirements():
    text = (REPO / "cog.yaml").read_text()
    assert 'run: "handler/cog_predictor.py:Predictor"' in text
    assert "python_requirements: docker/requirements.txt" in text and "gpu: true" in text


# -- the real Cog server ------------------------------------------------------------------------


class WebhookSink:
    """Collects the prediction updates coglet posts to a webhook on 127.0.0.1, and records any
    GET (answered with a small PNG)."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.gets: list[str] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sink.events.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def do_GET(self):  # noqa: N802
                sink.gets.append(self.path)
                png = sink_png()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def cog(cog_server):
    return cog_server[0]


@pytest.fixture(scope="module")
def cog_server(demo_volume, tmp_path_factory):
    """The real Cog HTTP server on the demo volume: (url, server)."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # coglet starts its worker with `python` from PATH
    server = Server(
        [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
        env={
            "COG_PREDICT_TYPE_STUB": "handler/cog_predictor.py:Predictor",
            "PORT": str(port),
            "MODELS_DIR": str(demo_volume),
            "DEFAULT_CHECKPOINT": "demo-sd15",
            "DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        },
        log_path=tmp_path_factory.mktemp("cog") / "cog.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_until(
            lambda: requests.get(f"{url}/health-check", timeout=2).json()["status"] == "READY"
        )
        yield url, server
    finally:
        server.stop()


def predict(url, job_input, timeout=300) -> requests.Response:
    """POST a prediction; a 409 means the single slot is still being released, so try again."""
    for _ in range(100):
        response = requests.post(f"{url}/predictions", json={"input": job_input}, timeout=timeout)
        if response.status_code != 409:
            return response
        time.sleep(0.1)
    return response


def decode(data_url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def test_health_check_is_ready(cog):
    assert requests.get(f"{cog}/health-check", timeout=5).json()["status"] == "READY"


def test_openapi_shows_inputs_with_descriptions(cog):
    schema = requests.get(f"{cog}/openapi.json", timeout=5).json()
    inputs = schema["components"]["schemas"]["Input"]
    assert inputs["required"] == ["prompt"]
    assert "multiple of 8" in inputs["properties"]["width"]["description"]
    assert inputs["properties"]["num_inference_steps"]["maximum"] == 150
    assert schema["components"]["schemas"]["scheduler"]["enum"] == [
        *SCHEDULER_NAMES,
        *COG_SDXL_SCHEDULERS,
    ]


def test_prediction_returns_images_with_seeds(cog):
    response = predict(
        cog,
        {
            "prompt": "a cube",
            "width": 64,
            "height": 64,
            "num_inference_steps": 2,
            "seed": 9,
            "num_outputs": 2,
            "loras": "demo_sd15_kohya:0.5",
        },
    )
    body = response.json()
    assert body["status"] == "succeeded", body
    assert len(body["output"]) == 2 and decode(body["output"][0]).size == (64, 64)
    assert "image 0: seed 9" in body["logs"] and "image 1: seed 10" in body["logs"]
    assert "Seed: 10" in decode(body["output"][1]).info["parameters"]
    assert "<lora:demo_sd15_kohya:0.5>" in decode(body["output"][0]).info["parameters"]
    # progress as tqdm prints it: Replicate's clients read it (replicate-javascript's pattern)
    tqdm = re.compile(r"^\s*(\d+)%\s*\|.+?\|\s*(\d+)\/(\d+)")
    progress = [tqdm.match(line) for line in body["logs"].splitlines() if tqdm.match(line)]
    assert progress and progress[-1].groups() == ("100", "2", "2"), body["logs"]


def test_jpg_is_a_format_as_replicates_other_models_name_it(cog):
    job = {"prompt": "a cube", "width": 64, "height": 64, "num_inference_steps": 1}
    body = predict(cog, {**job, "output_format": "jpg"}).json()
    assert body["status"] == "succeeded", body
    assert decode(body["output"][0]).format == "JPEG"


def test_cfg_rescale_runs_and_needs_cfg(cog):
    job = {"prompt": "a cube", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 3}
    body = predict(cog, {**job, "guidance_rescale": 0.7}).json()
    assert body["status"] == "succeeded", body
    assert "Rescale CFG: 0.7" in decode(body["output"][0]).info["parameters"]
    assert predict(cog, {**job, "guidance_rescale": 1.5}).status_code == 422
    body = predict(cog, {**job, "guidance_rescale": 0.7, "guidance_scale": 1.0}).json()
    assert body["status"] == "failed" and "guidance_rescale" in body["error"], body


def test_schedule_types_are_a1111s_and_reach_the_sampler(cog):
    from handler.schedulers import SCHEDULE_TYPES

    assert cog_inputs()["schedule_type"].choices == ["Automatic", *SCHEDULE_TYPES]
    job = {"prompt": "a cube", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 3}
    body = predict(cog, {**job, "scheduler": "DPM++ 2M", "schedule_type": "Exponential"}).json()
    assert body["status"] == "succeeded", body
    parameters = decode(body["output"][0]).info["parameters"]
    assert "Sampler: DPM++ 2M, Schedule type: Exponential" in parameters
    body = predict(cog, {**job, "scheduler": "DDIM", "schedule_type": "DDIM"}).json()
    assert body["status"] == "succeeded", body  # DDIM runs on its own schedule type
    # cog-sdxl's class name is its sampler alone: a schedule type replaces its default spacing
    inputs = {**job, "scheduler": "DPMSolverMultistep", "schedule_type": "Karras"}
    body = predict(cog, inputs).json()
    assert body["status"] == "succeeded", body
    assert (
        "Sampler: DPM++ 2M, Schedule type: Karras" in decode(body["output"][0]).info["parameters"]
    )
    for scheduler, schedule, field in (
        ("DPM++ 2M Karras", "Beta", "schedule_type"),  # names its own already
        ("KarrasDPM", "Karras", "schedule_type"),  # cog-sdxl's name for DPM++ 2M Karras
        ("Euler a", "Karras", "schedule_type"),  # has no Karras schedule: the type's fault
        ("DDIM", "Karras", "schedule_type"),
    ):
        inputs = {**job, "scheduler": scheduler, "schedule_type": schedule}
        body = predict(cog, inputs).json()
        assert body["status"] == "failed" and f"invalid_input: {field}: " in body["error"], body
    # what the form would take with it: schedule types, not A1111's combined names
    assert "(accepted: Automatic, SGM Uniform, DDIM)" in body["error"], body["error"]


def test_out_of_range_input_is_a_422_naming_the_field(cog):
    response = predict(cog, {"prompt": "x", "num_inference_steps": 500})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "input", "num_inference_steps"]


def test_the_largest_seed_is_accepted_and_one_more_is_a_422(cog):
    job = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1}
    assert predict(cog, {**job, "seed": 2**64 - 1}).json()["status"] == "succeeded"
    too_big = predict(cog, {**job, "seed": 2**64})
    assert too_big.status_code == 422 and too_big.json()["detail"][0]["loc"][-1] == "seed"


def test_unknown_checkpoint_fails_with_model_not_found_and_the_names(cog):
    body = predict(cog, {"prompt": "x", "checkpoint": "demo-sdx"}).json()
    assert body["status"] == "failed"
    assert "model_not_found" in body["error"] and "demo-sdxl" in body["error"]


def test_prompt_text_stays_out_of_the_cog_server_log(cog_server):
    """coglet logs every failed prediction's error and every line the predictor prints (its
    warnings): a LoRA tag missing its `>` runs on into the prompt, and none of it may show."""
    url, server = cog_server
    small = {"width": 64, "height": 64, "num_inference_steps": 1}
    warned = predict(url, {**small, "prompt": "ZZMARK a cube <hypernet:x ZZSPAN1 detailed> end"})
    assert warned.json()["status"] == "succeeded"
    failed = predict(url, {**small, "prompt": "ZZMARK <lora:demo_sd15_kohya:0.8 a ZZSPAN2> end"})
    assert failed.json()["status"] == "failed" and "LoRA tag 1 of prompt" in failed.json()["error"]
    missing = predict(url, {**small, "prompt": "ZZMARK <lora:ZZSPAN3 a red car>"})
    assert "model_not_found" in missing.json()["error"]
    log = server.log()
    assert "removed: only LoRA extra networks" in log  # the warning was printed, without text
    assert "ZZMARK" not in log and "ZZSPAN" not in log


def test_same_seed_gives_identical_images(cog):
    job = {"prompt": "a cube", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 1234}
    first, second = predict(cog, job).json(), predict(cog, job).json()
    assert first.get("status") == second.get("status") == "succeeded", (first, second)
    assert decode(first["output"][0]).tobytes() == decode(second["output"][0]).tobytes()


def test_img2img_from_a_data_url(cog):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = predict(
        cog,
        {
            "prompt": "x",
            "image": data_url,
            "prompt_strength": 0.5,
            "num_inference_steps": 4,
            "seed": 2,
        },
    ).json()
    assert body["status"] == "succeeded", body
    assert decode(body["output"][0]).size == (64, 64)


def test_inpainting_with_a_mask_file(cog):
    import numpy as np

    init = Image.fromarray((np.random.RandomState(3).rand(64, 64, 3) * 255).astype("uint8"))
    mask = np.zeros((64, 64), dtype="uint8")
    mask[:, 32:] = 255

    def data_url(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    body = predict(
        cog,
        {
            "prompt": "x",
            "image": data_url(init),
            "mask": data_url(Image.fromarray(mask)),
            "mask_blur": 0,
            "num_inference_steps": 4,
            "seed": 2,
        },
    ).json()
    assert body["status"] == "succeeded", body
    out = np.asarray(decode(body["output"][0]).convert("RGB"))
    assert (out[:, :32] == np.asarray(init)[:, :32]).all()


def test_cancel_stops_between_steps_and_leaves_no_state(cog):
    job = {
        "prompt": "a cube",
        "width": 64,
        "height": 64,
        "num_inference_steps": 3,
        "seed": 77,
        "loras": "demo_sd15_peft:1",
    }
    sink = WebhookSink()
    try:
        long_job = {**job, "num_inference_steps": 150, "width": 256, "height": 256}
        response = requests.put(
            f"{cog}/predictions/cancel-me",
            json={"input": long_job, "webhook": sink.url},
            headers={"Prefer": "respond-async"},
            timeout=30,
        )
        assert response.status_code in (200, 202)
        deadline = time.monotonic() + 120
        while not any("denoising" in (e.get("logs") or "") for e in sink.events):
            assert time.monotonic() < deadline, sink.events
            time.sleep(0.2)
        requests.post(f"{cog}/predictions/cancel-me/cancel", timeout=30)
        while not any(e.get("status") == "canceled" for e in sink.events):
            assert time.monotonic() < deadline, sink.events[-1:]
            time.sleep(0.2)
        final = next(e for e in sink.events if e.get("status") == "canceled")
        assert "150/150 [denoising]" not in (final.get("logs") or "")
    finally:
        sink.close()
    plain = {k: v for k, v in job.items() if k != "loras"}
    after = predict(cog, plain).json()
    with_lora = predict(cog, job).json()
    again = predict(cog, plain).json()
    assert after["status"] == again["status"] == "succeeded"
    assert decode(after["output"][0]).tobytes() == decode(again["output"][0]).tobytes()
    assert decode(with_lora["output"][0]).tobytes() != decode(after["output"][0]).tobytes()


def test_a_cancel_right_after_the_prediction_starts_never_wedges_the_container(cog):
    """A cancel that lands as run() hands its job over (a client's cancel button, a timeout)
    used to leave the container busy for good, every later prediction answered 409: it could
    kill a newly started job thread before it ran. Each ends, and the container takes more."""
    sink = WebhookSink()
    long_job = {
        "prompt": "a cube",
        "width": 128,
        "height": 128,
        "num_inference_steps": 150,
        "seed": 4,
    }
    try:
        for attempt in range(24):
            name = f"race-{attempt}"
            response = requests.put(
                f"{cog}/predictions/{name}",
                json={"input": long_job, "webhook": sink.url},
                headers={"Prefer": "respond-async"},
                timeout=30,
            )
            assert response.status_code in (200, 202), response.text
            time.sleep((attempt % 4) * 0.0005)
            requests.post(f"{cog}/predictions/{name}/cancel", timeout=30)
            deadline = time.monotonic() + 60
            while not any(
                e.get("id") == name and e.get("status") in ("canceled", "succeeded", "failed")
                for e in sink.events
            ):
                assert time.monotonic() < deadline, f"{name} never ended"
                time.sleep(0.02)
            while requests.get(f"{cog}/health-check", timeout=5).json()["status"] != "READY":
                assert time.monotonic() < deadline, f"still busy after {name}"
                time.sleep(0.02)
    finally:
        sink.close()
    job = {"prompt": "a cube", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 4}
    assert predict(cog, job).json()["status"] == "succeeded"


# A small prediction taking an image (or mask) input
IMAGE_JOB = {
    "prompt": "x",
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
    "prompt_strength": 0.5,
}


def test_url_inputs_follow_the_worker_url_rules(cog):
    # coglet would download these itself; the predictor routes them through handler.inputs
    sink = WebhookSink()
    try:
        base = sink.url.rsplit("/", 1)[0]
        job = IMAGE_JOB
        for url, expected in (
            (f"{base}/red.png", "http:// URLs are not accepted"),
            (base.replace("http://", "https://") + "/red.png", "non-public address"),
            (base.replace("127.0.0.1", "localhost") + "/red.png", "http:// URLs"),
        ):
            for field in ("image", "mask"):
                inputs = {**job, field: url}
                if field == "mask":
                    inputs["image"] = "data:image/png;base64," + base64.b64encode(
                        sink_png()
                    ).decode("ascii")
                response = predict(cog, inputs)
                text = response.text
                assert response.status_code in (200, 422), text
                assert response.status_code == 422 or response.json()["status"] == "failed"
                assert "invalid_input" in text and expected in text, text
        assert sink.gets == []  # nothing was fetched from the loopback server
    finally:
        sink.close()


def test_a_path_on_the_server_is_never_read(cog, tmp_path):
    """cog makes a `Path` input of any string that is no data/http(s) URL, upper-case `HTTP://`
    included: a path on the server. The predictor reads only the files cog wrote for uploads
    and URLs, and refuses the rest alike, existing or not, without naming them."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(sink_png())
    missing = tmp_path / "missing.png"
    job = IMAGE_JOB
    upload = "data:image/png;base64," + base64.b64encode(sink_png()).decode("ascii")
    raw_base64 = base64.b64encode(sink_png()).decode("ascii")  # a data: URI's payload alone
    for value in (str(secret), f"file://{secret}", str(missing), "HTTP://127.0.0.1:9/a.png"):
        for field in ("image", "mask"):
            inputs = {**job, field: value}
            if field == "mask":
                inputs["image"] = upload
            body = predict(cog, inputs).json()
            assert body["status"] == "failed", body
            assert f"invalid_input: {field}: " in body["error"], body["error"]
            assert "(raw base64, a path on the server) is not read" in body["error"]
            assert str(tmp_path) not in body["error"] and "9/a.png" not in body["error"]
    body = predict(cog, {**job, "image": raw_base64}).json()
    assert "invalid_input: image: " in body["error"] and "data:image/png;base64," in body["error"]
    # uploads still work, for the image and the mask alike
    body = predict(cog, {**job, "image": upload, "mask": upload}).json()
    assert body["status"] == "succeeded", body


def sink_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_hires_strength_without_hires_scale_is_refused(cog):
    job = {
        "prompt": "x",
        "width": 64,
        "height": 64,
        "num_inference_steps": 1,
        "hires_strength": 0.9,
    }
    body = predict(cog, job).json()
    assert body["status"] == "failed"
    assert "invalid_input: hires_strength" in body["error"] and "hires_scale" in body["error"]


def test_an_unexpected_error_fails_as_internal_error_without_its_text():
    from handler.errors import InternalError

    class BrokenEngine:
        def run(self, job, progress=None, cancelled=None, job_id="local"):
            raise IndexError("tuple index out of range, with a secret prompt")

    runner, inputs = predictor_on(BrokenEngine())
    with pytest.raises(InternalError) as raised:
        runner.run(**inputs)
    assert str(raised.value).startswith("internal_error:") and "secret" not in str(raised.value)


def test_cog_sdxls_inputs_run_as_cog_sdxl_runs_them(cog):
    """A payload written for Replicate's cog-sdxl: its input names, a scheduler of its own, and
    its refine switch, with the ensemble's high_noise_frac."""
    job = {
        "prompt": "a cube",
        "checkpoint": "demo-sdxl",
        "width": 64,
        "height": 64,
        "num_inference_steps": 4,
        "num_outputs": 2,
        "scheduler": "K_EULER",
        "seed": 5,
    }
    body = predict(cog, job).json()
    assert body["status"] == "succeeded", body
    assert len(body["output"]) == 2 and "4/4 [denoising]" in body["logs"]
    assert "refining" not in body["logs"]
    assert "Sampler: Euler," in decode(body["output"][0]).info["parameters"]
    refiner = {"refiner_checkpoint": "demo-sdxl-refiner", "num_outputs": 1}
    ensemble = {**job, **refiner, "refine": "expert_ensemble_refiner", "high_noise_frac": 0.5}
    body = predict(cog, ensemble).json()
    assert body["status"] == "succeeded", body
    assert "2/2 [denoising]" in body["logs"] and "2/2 [refining]" in body["logs"], body["logs"]
    after = {**job, **refiner, "refine": "base_image_refiner", "refine_steps": 10}
    body = predict(cog, after).json()
    assert body["status"] == "succeeded", body
    assert "4/4 [denoising]" in body["logs"] and "3/3 [refining]" in body["logs"], body["logs"]


@pytest.mark.parametrize(
    "inputs",
    [
        {"refiner_checkpoint": "demo-sdxl-refiner"},  # refine is no_refiner
        {"refine_steps": 10},
        {"refine": "expert_ensemble_refiner"},  # this model sets no REFINER_CHECKPOINT
        # the hires fix and inpainting run without the refiner: an explicit choice is refused
        {
            "refine": "base_image_refiner",
            "refiner_checkpoint": "demo-sdxl-refiner",
            "hires_scale": 1.5,
        },
        {
            "refine": "expert_ensemble_refiner",
            "refiner_checkpoint": "demo-sdxl-refiner",
            "image": "PNG",
            "mask": "PNG",
        },
    ],
)
def test_refiner_inputs_that_cannot_run_as_asked_are_refused(cog, inputs):
    upload = "data:image/png;base64," + base64.b64encode(sink_png()).decode("ascii")
    inputs = {name: upload if value == "PNG" else value for name, value in inputs.items()}
    job = {"prompt": "a cube", "checkpoint": "demo-sdxl", "width": 64, "height": 64}
    body = predict(cog, {**job, "num_inference_steps": 2, **inputs}).json()
    assert body["status"] == "failed" and "invalid_input: refine: " in body["error"], body
    if "hires_scale" in inputs or "mask" in inputs:
        assert "run without the refiner" in body["error"], body["error"]


def test_the_engines_errors_name_the_forms_inputs(cog):
    """The engine refuses steps x strength < 1 as `strength`; the form calls it
    prompt_strength."""
    upload = "data:image/png;base64," + base64.b64encode(sink_png()).decode("ascii")
    job = {"prompt": "x", "image": upload, "num_inference_steps": 4, "prompt_strength": 0.1}
    body = predict(cog, job).json()
    assert body["status"] == "failed" and "invalid_input: prompt_strength: " in body["error"], body


def test_the_engine_logs_one_line_per_prediction_without_its_prompt(engine, caplog, tmp_path):
    runner, inputs = predictor_on(engine)
    runner.outputs = tmp_path  # what setup() makes
    with caplog.at_level("INFO", logger="handler.engine"):
        runner.run(**{**inputs, "prompt": "a secret cube", "num_inference_steps": 1})
    done = [r.getMessage() for r in caplog.records if " done: model=" in r.getMessage()]
    assert len(done) == 1 and "secret" not in caplog.text
    from handler.errors import ModelNotFound

    with caplog.at_level("INFO", logger="handler.engine"), pytest.raises(ModelNotFound):
        runner.run(**{**inputs, "checkpoint": "nope"})
    assert any(" failed: model_not_found" in r.getMessage() for r in caplog.records)


def test_a_lora_entry_at_fault_is_named_by_its_place(engine):
    from handler.errors import InvalidInput

    runner, inputs = predictor_on(engine)
    with pytest.raises(InvalidInput) as info:
        runner.run(**{**inputs, "loras": "demo_sd15_kohya, demo_sd15_peft:9"})
    assert info.value.field == "loras" and info.value.message.startswith("LoRA 2 of loras: ")


def test_a_prediction_whose_every_image_is_withheld_fails(settings, tmp_path, capsys):
    """Cog's output is the files alone: every image withheld would be an empty success."""
    from dataclasses import replace

    from handler.engine import Engine
    from handler.errors import ContentWithheld

    strict = Engine(replace(settings, safety_checker=True, safety_policy="withhold"))
    runner, inputs = predictor_on(strict)
    runner.outputs = tmp_path
    with pytest.raises(ContentWithheld) as info:
        runner.run(**{**inputs, "num_inference_steps": 1, "seed": 2, "num_outputs": 2})
    assert str(info.value).startswith("content_withheld: the safety checker withheld all 2")
    assert "image 1: seed 3, withheld by the safety checker" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_the_server_logs_one_line_per_prediction_without_its_prompt(cog_server):
    url, server = cog_server
    secret = "a confidential lighthouse"
    job = {"prompt": secret, "width": 64, "height": 64, "num_inference_steps": 1}
    body = predict(url, job).json()
    assert body["status"] == "succeeded", body
    refused = predict(url, {**job, "checkpoint": "nope"}).json()
    assert refused["status"] == "failed"
    text = server.log() + body["logs"] + (refused.get("logs") or "")
    assert " done: model=demo-sd15" in text and " failed: model_not_found" in text, text[-3000:]
    assert secret not in text


def test_setup_fails_when_the_image_holds_no_checkpoint(tmp_path, monkeypatch):
    """A Cog image's models are baked in: with none, the container said READY and failed every
    prediction with model_not_found. setup() fails instead (SETUP_FAILED on /health-check)."""
    from handler.cog_predictor import Predictor
    from handler.errors import InvalidInput

    monkeypatch.setenv("MODELS_DIR", str(tmp_path))
    monkeypatch.delenv("DEFAULT_CHECKPOINT", raising=False)
    monkeypatch.chdir(tmp_path)  # ./models, the image's own root, holds nothing here either
    with pytest.raises(InvalidInput) as info:
        Predictor().setup()
    assert info.value.field == "MODELS_DIR" and "no checkpoint" in info.value.message
