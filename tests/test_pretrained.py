"""--pretrained without cached weights: fetched the way timm fetches them (the Hugging Face hub
into its cache) when the hub answers, one line naming what to fetch and where when it does not."""
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPO, FILE = "timm/resnet18.a1_in1k", "model.safetensors"  # resnet18's hub weights (timm's pretrained cfg)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_pretrained(tmp_path, fixture_data, **env):
    """`pneumoscope train --arch resnet18 --pretrained` in a fresh process (huggingface_hub reads
    its environment at import), with an empty hub cache."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_CACHE": str(tmp_path / "hub"),
                   "TORCH_HOME": str(tmp_path / "torch"), **env}
    for key in [k for k, v in environment.items() if v is None]:
        environment.pop(key)
    return subprocess.run([sys.executable, "-m", "pneumoscope.cli", "train", "--data", str(fixture_data),
                           "--arch", "resnet18", "--pretrained", "--epochs", "1", "--img-size", "32",
                           "--out", str(tmp_path / "run")], env=environment, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"},
                                 {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}],
                         ids=["offline", "unreachable"])
def test_unfetchable_weights_are_one_line_naming_what_and_where(tmp_path, fixture_data, env):
    done = train_pretrained(tmp_path, fixture_data, **env)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr and "Retrying" not in done.stderr, done.stderr
    line = lines[0]
    assert f"hf download {REPO} {FILE}" in line and str(tmp_path / "hub") in line and "--no-pretrained" in line
    assert ("HF_HUB_OFFLINE" in line) == ("HF_HUB_OFFLINE" in env and env["HF_HUB_OFFLINE"] == "1")
    assert not (tmp_path / "run").exists()  # failed before any data was read or any run written


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers /<repo>/resolve/<revision>/<file> the way the Hugging Face hub does (commit and
    etag headers), for the files in `files`; 404 otherwise."""

    files: dict[str, bytes] = {}
    requests: list[str] = []

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool):
        self.requests.append(f"{self.command} {self.path} {self.headers.get('user-agent')}")
        data = self.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


LOAD = """
import sys, torch
from pneumoscope.nets.registry import create_model
model = create_model("resnet18", 3, pretrained=True)
torch.save({"conv1": model.backbone.conv1.weight.detach(), "var": model.backbone.layer4[1].bn2.running_var}, sys.argv[1])
"""


def test_weights_are_downloaded_into_the_hub_cache_timm_reads(tmp_path):
    """Online: the file comes from the hub (here a local one speaking its protocol) into the
    Hugging Face cache, once, and the network is built from exactly those weights (the RGB stem
    summed to one channel). Training takes the same path (train.with_defaults -> ensure_pretrained)."""
    import timm
    import torch
    from safetensors.torch import save

    torch.manual_seed(0)
    weights = timm.create_model("resnet18", pretrained=False).state_dict()
    served = save(weights)
    FakeHub.files = {f"/{REPO}/resolve/main/{FILE}": served}
    FakeHub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_CACHE": str(tmp_path / "hub"),
                   "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}"}
    environment.pop("HF_HUB_OFFLINE", None)
    try:
        done = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "loaded.pt")], env=environment,
                              capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    cached = list((tmp_path / "hub").glob(f"models--timm--resnet18.a1_in1k/snapshots/*/{FILE}"))
    assert len(cached) == 1 and cached[0].read_bytes() == served
    file_requests = [r.split()[0] for r in FakeHub.requests if f"/{REPO}/" in r]
    assert file_requests.count("GET") == 1, FakeHub.requests  # one download, no retries
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert torch.allclose(loaded["conv1"], weights["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(loaded["var"], weights["layer4.1.bn2.running_var"])
