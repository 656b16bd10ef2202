"""Model registry, tiny model, checkpoint resolution, download and safe loading."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from segment_anything import sam_model_registry

from samcache.cli import main
from samcache.errors import CheckpointError
from samcache.fileio import sha256_file
from samcache.models import weights as models
from tests.helpers import EMBED_FLAGS, micro_weights


def test_tiny_is_deterministic_and_seeded():
    a, b = models.load_sam("tiny", seed=0, random_init=True), models.load_sam("tiny", seed=0, random_init=True)
    c = models.load_sam("tiny", seed=1, random_init=True)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    for key, tensor in a.sam.state_dict().items():
        assert torch.equal(tensor, b.sam.state_dict()[key])
    assert "random" in a.weights_source


def test_tiny_has_sams_geometry_and_exact_decoder():
    tiny = models.build_tiny(0)
    vit_b = models.build_sam("vit_b")
    with torch.inference_mode():
        features = tiny.image_encoder(torch.zeros(1, 3, 1024, 1024))
    assert features.shape == (1, 256, 64, 64)
    for part in ("prompt_encoder", "mask_decoder"):
        tiny_sd, ref_sd = getattr(tiny, part).state_dict(), getattr(vit_b, part).state_dict()
        assert {k: v.shape for k, v in tiny_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    encoder_params = sum(p.numel() for p in tiny.image_encoder.parameters())
    assert encoder_params < 0.05 * sum(p.numel() for p in vit_b.image_encoder.parameters())


def test_random_vit_b_in_official_layout_loads(vit_b_checkpoint):
    loaded = models.load_sam("vit_b", vit_b_checkpoint)
    reference = sam_model_registry["vit_b"](checkpoint=str(vit_b_checkpoint))  # proves the layout is official
    for key, tensor in reference.state_dict().items():
        assert torch.equal(loaded.sam.state_dict()[key], tensor)
    assert loaded.weights_sha256 == hashlib.sha256(vit_b_checkpoint.read_bytes()).hexdigest()
    assert loaded.model_type == "vit_b"


def test_wrong_model_type_names_expected_and_actual(vit_b_checkpoint):
    with pytest.raises(CheckpointError) as info:
        models.load_sam("vit_l", vit_b_checkpoint)
    message = str(info.value)
    assert "vit_l model" in message and "looks like a vit_b" in message and str(vit_b_checkpoint) in message


def test_state_dict_with_missing_keys_is_refused(tmp_path):
    sd = models.build_tiny(0).state_dict()
    del sd["mask_decoder.iou_token.weight"]
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="missing key.*mask_decoder.iou_token.weight"):
        models.load_sam("tiny", path)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Exploit.marker}",))


def test_pickle_that_would_run_code_is_refused_and_not_run(tmp_path):
    _Exploit.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        models.load_sam("vit_b", path)
    assert not _Exploit.marker.exists()


def test_safetensors_checkpoint_loads(tmp_path):
    from safetensors.torch import save_file

    sam = models.build_tiny(3)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(path))
    loaded = models.load_sam("tiny", path)
    assert all(torch.equal(v, sam.state_dict()[k]) for k, v in loaded.sam.state_dict().items())


def test_wrapped_state_dict_is_unwrapped(tmp_path):
    sam = models.build_tiny(4)
    path = tmp_path / "trainer.pth"
    torch.save({"model": sam.state_dict(), "epoch": 3}, path)
    loaded = models.load_sam("tiny", path)
    assert torch.equal(loaded.sam.mask_decoder.iou_token.weight, sam.mask_decoder.iou_token.weight)


def test_missing_checkpoint_path_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        models.load_sam("vit_b", tmp_path / "nope.pth")


def test_unknown_model_type():
    with pytest.raises(CheckpointError, match="unknown model type 'vit_x'"):
        models.load_sam("vit_x")


def _serve(directory: Path):
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(directory), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _fake_official(monkeypatch, url: str, payload: bytes):
    official = models.OfficialWeights(url, hashlib.sha256(payload).hexdigest(), len(payload))
    monkeypatch.setitem(models.OFFICIAL_WEIGHTS, "vit_b", official)
    return official


def test_download_verifies_sha256_and_lands_in_home(tmp_path, monkeypatch, vit_b_checkpoint):
    served = tmp_path / "served"
    served.mkdir()
    payload = vit_b_checkpoint.read_bytes()
    (served / "sam_vit_b_01ec64.pth").write_bytes(payload)
    server = _serve(served)
    try:
        _fake_official(monkeypatch, f"http://127.0.0.1:{server.server_port}/sam_vit_b_01ec64.pth", payload)
        # What load_sam would load (loading vit_b from Meta's layout: test_random_vit_b_in_official_layout_loads)
        found = models.identify_weights("vit_b")
        home_file = models.samcache_home() / "sam_vit_b_01ec64.pth"
        assert home_file.read_bytes() == payload
        assert found.weights_source == str(home_file) and found.path == home_file
        # The second call finds the verified file and does not download again.
        server.shutdown()
        assert models.identify_weights("vit_b").weights_sha256 == hashlib.sha256(payload).hexdigest()
    finally:
        server.shutdown()


def test_download_with_wrong_sha256_keeps_nothing(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    (served / "sam_vit_b_01ec64.pth").write_bytes(b"not the weights")
    server = _serve(served)
    try:
        _fake_official(monkeypatch, f"http://127.0.0.1:{server.server_port}/sam_vit_b_01ec64.pth", b"the weights")
        with pytest.raises(CheckpointError, match="SHA-256"):
            models.resolve_checkpoint("vit_b", None)
        assert [p.name for p in models.samcache_home().iterdir()] == ["openvino"]  # only the tests' shared link
    finally:
        server.shutdown()


def test_offline_error_says_how_to_pass_checkpoint(monkeypatch):
    _fake_official(monkeypatch, "http://127.0.0.1:9/sam_vit_b_01ec64.pth", b"x")
    with pytest.raises(CheckpointError) as info:
        models.load_sam("vit_b")
    assert "--checkpoint PATH" in str(info.value) and "SAMCACHE_HOME" in str(info.value)


def test_corrupted_file_in_home_is_refused(monkeypatch):
    _fake_official(monkeypatch, "http://127.0.0.1:9/sam_vit_b_01ec64.pth", b"good")
    home = models.samcache_home()
    home.mkdir(parents=True, exist_ok=True)
    (home / "sam_vit_b_01ec64.pth").write_bytes(b"bad!")
    with pytest.raises(CheckpointError, match="delete it to download again"):
        models.resolve_checkpoint("vit_b", None)


def test_file_hash_cache_tracks_changes(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    path.write_bytes(b"one")
    os.utime(path, ns=(10**18, 10**18))
    assert models.file_sha256_cached(path) == hashlib.sha256(b"one").hexdigest()
    models.remember_sha256(path)
    monkeypatch.setattr(models, "_HASHED", {})  # as a new process would
    path.write_bytes(b"two")  # the same size: only the modification time tells
    os.utime(path, ns=(10**18 + 1, 10**18 + 1))
    assert models.file_sha256_cached(path) == hashlib.sha256(b"two").hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]


def _listing(folder: Path) -> dict[str, bytes | None]:
    """The entries of `folder` and the bytes of its files."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in folder.iterdir()}


def test_embed_writes_nothing_beside_the_weights_and_hashes_them_once(stamps, tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    weights = micro_weights(folder, 3)
    before = _listing(folder)
    hashed = []
    monkeypatch.setattr(models, "sha256_file", lambda path: hashed.append(path) or sha256_file(path))
    for _ in range(2):
        result = CliRunner().invoke(main, ["embed", str(stamps), "--out", str(tmp_path / "cache"),
                                           "--checkpoint", str(weights), *EMBED_FLAGS])
        assert result.exit_code == 0, result.output
        monkeypatch.setattr(models, "_HASHED", {})  # the next command as a new process: only the hash cache is left
    assert _listing(folder) == before
    assert len(hashed) == 1
    entries = [json.loads(p.read_text()) for p in (models.samcache_home() / "hashes").iterdir()]
    assert [(e["path"], e["sha256"]) for e in entries] == [(str(weights.resolve()), sha256_file(weights))]


@pytest.mark.parametrize("refused", ["garbage", "not meta's"])
def test_a_refused_weights_file_leaves_nothing_behind(stamps, tmp_path, monkeypatch, refused):
    home = models.samcache_home()
    if refused == "garbage":
        folder = tmp_path / "weights"
        folder.mkdir()
        (folder / "w.pth").write_bytes(b"not a checkpoint")
        flags, expected = ["--checkpoint", str(folder / "w.pth"), *EMBED_FLAGS], f"{folder / 'w.pth'} is not a PyTorch checkpoint"
    else:
        _fake_official(monkeypatch, "http://127.0.0.1:9/sam_vit_b_01ec64.pth", b"good")
        folder = home
        (home / "sam_vit_b_01ec64.pth").write_bytes(b"bad!")
        flags, expected = ["--model", "vit_b", *EMBED_FLAGS[2:]], "delete it to download again"
    before, home_before = _listing(folder), _listing(home)
    result = CliRunner().invoke(main, ["embed", str(stamps), "--out", str(tmp_path / "cache"), *flags])
    assert result.exit_code == 1 and expected in result.output and "Traceback" not in result.output
    assert _listing(folder) == before and _listing(home) == home_before


def test_an_unwritable_hash_cache_only_costs_hashing_again(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SAMCACHE_HOME", str(blocker / "home"))  # no folder can be made there, even by root
    folder = tmp_path / "weights"
    folder.mkdir()
    weights = micro_weights(folder, 3)
    loaded = models.load_sam("micro", weights)
    assert loaded.weights_sha256 == sha256_file(weights)
    assert [p.name for p in folder.iterdir()] == [weights.name]


def test_weights_that_are_not_meta_s_are_never_downloaded_in_their_place(monkeypatch, vit_b_checkpoint, tmp_path):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(models.urllib.request, "urlopen", no_download)
    digest = hashlib.sha256(vit_b_checkpoint.read_bytes()).hexdigest()
    found = models.load_matching("vit_b", digest, recorded_source=str(vit_b_checkpoint))
    assert found.weights_sha256 == digest
    with pytest.raises(CheckpointError, match=rf"SHA-256 {digest} from {tmp_path / 'gone.pth'}, which is not there"):
        models.load_matching("vit_b", digest, recorded_source=str(tmp_path / "gone.pth"))
