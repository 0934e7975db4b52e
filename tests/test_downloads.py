"""Released weights by name and checkpoints by run-folder prefix: a local HTTP server on 127.0.0.1 stands in for the
official URLs (hash match and mismatch, a download cut off mid-way, offline, cache hit, local file first)."""

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from diffcompress import downloads
from diffcompress.downloads import Release, resolve_checkpoint, resolve_run_prefix
from diffcompress.errors import UserError
from models_with_layer_pruning import create_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend on a shared machine
NAME = "DiT-XL-2-256x256.pt"
BODY = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB: several reads, a cut in the middle


class Server:
    """Serves ``files`` (path -> bytes); ``cut`` sends the full Content-Length but only half the body, then closes."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests = 0
        self.cut = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if server.cut else body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture()
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A fresh working directory and cache; no proxy, network allowed (the local server only)."""
    for var in ("http_proxy", "HTTP_PROXY", "DIFFCOMPRESS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFCOMPRESS_PRETRAINED", str(tmp_path / "cache"))
    return tmp_path


def release(monkeypatch, server, body=BODY, sha256="auto", name=NAME):
    server.files["/" + name] = body
    digest = hashlib.sha256(body).hexdigest() if sha256 == "auto" else sha256
    monkeypatch.setitem(downloads.RELEASED, name, Release(server.url("/" + name), digest, "test checkpoint"))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_download_checks_sha256_and_keeps_nothing_on_mismatch(home, server, monkeypatch, capsys):
    release(monkeypatch, server, sha256="0" * 64)
    with pytest.raises(UserError) as e:
        resolve_checkpoint(NAME)
    assert "sha256" in one_line(e) and "0" * 64 in str(e.value) and str(home / "cache" / NAME) in str(e.value)
    assert list((home / "cache").iterdir()) == []  # no temporary file, nothing under the real name

    release(monkeypatch, server)
    path = Path(resolve_checkpoint(NAME))
    assert path == home / "cache" / NAME and path.read_bytes() == BODY
    assert [p.name for p in (home / "cache").iterdir()] == [NAME]
    assert path.stat().st_mode & 0o777 == 0o666 & ~downloads._umask()  # the user's umask, not mkstemp's 0600
    assert "sha256 checked" in capsys.readouterr().out


def test_interrupted_download_leaves_no_file_and_a_retry_works(home, server, monkeypatch):
    release(monkeypatch, server)
    server.cut = True
    with pytest.raises(UserError) as e:
        resolve_checkpoint(NAME)
    assert "broke off" in one_line(e) and "run again" in str(e.value)
    assert list((home / "cache").iterdir()) == []
    server.cut = False
    assert Path(resolve_checkpoint(NAME)).read_bytes() == BODY


def test_offline_says_url_and_destination(home, server, monkeypatch):
    url = "http://127.0.0.1:9/DiT-XL-2-256x256.pt"  # nothing listens on the discard port: refused at once
    monkeypatch.setitem(downloads.RELEASED, NAME, Release(url, None, "DiT-XL/2 256x256 checkpoint"))
    with pytest.raises(UserError) as e:
        resolve_checkpoint(NAME)
    assert url in one_line(e) and str(home / "cache" / NAME) in str(e.value)
    assert not (home / "cache" / NAME).exists()
    release(monkeypatch, server)
    monkeypatch.setenv("DIFFCOMPRESS_OFFLINE", "1")  # never tries the network
    with pytest.raises(UserError) as e:
        resolve_checkpoint("TinyDiT-D14-MaskedKD-500K.pt", "--load-weight")
    msg = one_line(e)
    assert downloads.RELEASED["TinyDiT-D14-MaskedKD-500K.pt"].url in msg and "--load-weight PATH" in msg
    assert server.requests == 0


def test_cache_hit_and_local_files_need_no_request(home, server, monkeypatch, capsys):
    release(monkeypatch, server)
    (home / "cache").mkdir()
    (home / "cache" / NAME).write_bytes(b"cached")
    assert resolve_checkpoint(NAME) == str(home / "cache" / NAME)
    assert resolve_checkpoint(f"pretrained/{NAME}") == str(home / "cache" / NAME)  # the authors' folder, missing
    (home / NAME).write_bytes(b"local")
    assert resolve_checkpoint(NAME) == NAME  # a file of that name here wins
    (home / "cache" / NAME).unlink()
    (home / NAME).unlink()
    (home / "pretrained").mkdir()
    (home / "pretrained" / NAME).write_bytes(b"theirs")
    assert resolve_checkpoint(NAME) == str(Path("pretrained") / NAME)  # where TinyFusion's README puts it
    assert server.requests == 0
    assert resolve_checkpoint(None) is None


def test_download_script_fetches_once_and_prints_the_path(home, server, monkeypatch, script):
    release(monkeypatch, server)
    result = script("download.py", "--model", NAME)
    assert result.code == 0 and result.out.strip().splitlines()[-1] == str(home / "cache" / NAME)
    assert script("download.py", "--model", NAME).code == 0 and server.requests == 1
    result = script("download.py")
    assert result.code == 2 and "nothing to fetch" in result.last_line


def make_run(root: Path, folder: str, step: str = "0500000.pt") -> Path:
    path = root / "outputs" / folder / "checkpoints" / step
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"ckpt")
    return path


def test_run_folder_prefix(home, capsys):
    short = "outputs/D14-Learned-Finetuning/checkpoints/0500000.pt"
    with pytest.raises(UserError) as e:  # nothing yet: say what exists
        resolve_run_prefix(short)
    assert "no such file" in one_line(e) and "outputs" in str(e.value)
    (home / "outputs").mkdir()
    make_run(home, "D7-Masked-KD-DiT-D7-2")
    with pytest.raises(UserError) as e:
        resolve_checkpoint(short)
    assert "outputs holds: D7-Masked-KD-DiT-D7-2/" in one_line(e)

    full = make_run(home, "D14-Learned-Finetuning-DiT-D14-2")
    capsys.readouterr()
    assert Path(resolve_checkpoint(short)) == full.relative_to(home)
    assert "note: --ckpt" in capsys.readouterr().out
    assert resolve_checkpoint(str(full)) == str(full)  # an existing path as it is, no note
    assert capsys.readouterr().out == ""

    with pytest.raises(UserError) as e:  # the run exists, the step does not: list its checkpoints
        resolve_checkpoint("outputs/D14-Learned-Finetuning/checkpoints/0400000.pt", "--load-weight")
    assert one_line(e).startswith("--load-weight") and "0500000.pt" in str(e.value)

    make_run(home, "D14-Learned-Finetuning-Other-DiT-D14-2", "0010000.pt")  # a longer prefix, not this file
    assert Path(resolve_checkpoint(short)) == full.relative_to(home)
    make_run(home, "000-D14-Learned-Finetuning-DiT-D14-2")  # DiT's numbered folders match too: now two
    with pytest.raises(UserError) as e:
        resolve_checkpoint(short)
    msg = one_line(e)
    assert "2 run folders" in msg and "000-D14-Learned-Finetuning-DiT-D14-2/" in msg
    assert "outputs/D14-Learned-Finetuning-DiT-D14-2/" in msg
    with pytest.raises(UserError, match="a folder, expected a checkpoint file"):
        resolve_checkpoint("outputs")


@pytest.mark.slow  # a whole pipeline end to end
def test_sample_script_downloads_a_released_checkpoint_by_name(home, server, monkeypatch, script):
    """sample.py --ckpt <released name>: fetched from the stand-in URL into the cache, loaded, sampled; then cached."""
    torch.manual_seed(0)
    model = create_model("DiT-S/8", input_size=16, in_channels=3, num_classes=10)
    torch.save(model.state_dict(), home / "weights.pt")
    release(monkeypatch, server, (home / "weights.pt").read_bytes(), name="TinyDiT-D14-MaskedKD-500K.pt")
    flags = ["--model", "DiT-S/8", "--image-size", "16", "--vae", "none", "--num-classes", "10",
             "--num-sampling-steps", "2", "--device", "cpu", "--class-labels", "0,1", "--out", "x.png"]  # fmt: skip
    result = script("sample.py", *flags, "--ckpt", "TinyDiT-D14-MaskedKD-500K.pt")
    assert result.code == 0, result.err
    assert "downloaded" in result.out and (home / "cache" / "TinyDiT-D14-MaskedKD-500K.pt").is_file()
    assert "in fp32 in" in result.out and (home / "x.png").is_file()  # fp32 on CPU, no TF32 there
    assert script("sample.py", *flags, "--ckpt", "TinyDiT-D14-MaskedKD-500K.pt").code == 0 and server.requests == 1
    result = script("sample.py", *flags)  # no --ckpt, not DiT-XL/2: ask for one instead of random weights
    assert result.code == 2 and "--ckpt is required" in result.last_line and "--random-init" in result.last_line
    result = script("sample.py", *flags, "--random-init")
    assert result.code == 0 and "--random-init" in result.out


def test_vae_by_name_local_copy_or_one_line(home, monkeypatch):
    from diffusers import AutoencoderKL

    from diffcompress import vae as vae_module

    monkeypatch.setitem(vae_module.HUB_VAES, "ema", "diffcompress-tests/no-such-vae")  # never in any cache
    monkeypatch.setenv("DIFFCOMPRESS_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        vae_module.load_vae("ema")
    msg = one_line(e)
    assert "https://huggingface.co/diffcompress-tests/no-such-vae" in msg and str(home / "cache" / "no-such-vae") in msg
    tiny = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))  # fmt: skip
    tiny.save_pretrained(home / "cache" / "no-such-vae")
    codec = vae_module.load_vae("ema")  # the copy where the message said to put it, no network
    assert codec.name == str(home / "cache" / "no-such-vae") and codec.channels == 4
