"""The CLI's answers to bad input: exit status 2 and one clear sentence, never a traceback."""

import json

import numpy as np
import pytest
from conftest import png_bytes, run_cli


def assert_one_clear_line(result, *fragments):
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("nnm: error: ")
    for fragment in fragments:
        assert fragment in err, err


def test_unknown_dataset(tmp_path):
    r = run_cli("pipeline", "--dataset", "no-such-set", "--out", str(tmp_path / "o"))
    assert_one_clear_line(r, "neither a built-in dataset")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli("pipeline", "--dataset", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert_one_clear_line(r, "no images found")


def test_corrupt_image(tmp_path):
    d = tmp_path / "imgs" / "a"
    d.mkdir(parents=True)
    (d / "x.png").write_bytes(png_bytes(np.zeros((8, 8), np.uint8))[:30])
    r = run_cli("pipeline", "--dataset", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"))
    assert_one_clear_line(r, "x.png")


def test_fewer_images_than_clusters(tmp_path):
    d = tmp_path / "few"
    d.mkdir()
    for i in range(5):
        (d / f"{i}.png").write_bytes(png_bytes(np.full((8, 8), i * 40, np.uint8)))
    r = run_cli("pipeline", "--dataset", str(d), "--clusters", "10", "--preset", "quick", "--out", str(tmp_path / "o"))
    assert_one_clear_line(r, "5 images, fewer than the 10 clusters")


def test_unlabelled_folder_needs_k(tmp_path):
    d = tmp_path / "flat"
    d.mkdir()
    for i in range(5):
        (d / f"{i}.png").write_bytes(png_bytes(np.full((8, 8), i * 40, np.uint8)))
    r = run_cli("pipeline", "--dataset", str(d), "--preset", "quick", "--out", str(tmp_path / "o"))
    assert_one_clear_line(r, "--clusters K")


@pytest.mark.parametrize("k", ["1", "0"])
def test_k_below_two(tmp_path, k):
    r = run_cli("pipeline", "--dataset", "digits", "--clusters", k, "--out", str(tmp_path / "o"))
    assert_one_clear_line(r, "'cluster.clusters'", "greater than or equal to 2")


def test_unknown_preset_and_key(tmp_path):
    assert_one_clear_line(
        run_cli("pipeline", "--dataset", "digits", "--preset", "turbo", "--out", str(tmp_path)),
        "unknown preset 'turbo'",
    )
    assert_one_clear_line(
        run_cli("config", "--dataset", "digits", "--set", "pretext.epoch=3"), "unknown key 'pretext.epoch'"
    )


def test_unreadable_checkpoint(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text(
        json.dumps(
            {
                "backbone": {"arch": "resnet18-cifar", "width": 8},
                "in_channels": 1,
                "image_size": 8,
                "mean": [0.5],
                "std": [0.2],
                "clusters": 10,
            }
        )
    )
    (model / "model.pt").write_bytes(b"definitely not a checkpoint")
    img = tmp_path / "x.png"
    img.write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    assert_one_clear_line(run_cli("assign", "--model", str(model), str(img)), "cannot read checkpoint 'model.pt'")
    assert_one_clear_line(run_cli("assign", "--model", str(tmp_path / "nothing"), str(img)), "holds no trained model")


def test_config_prints_the_resolved_preset():
    r = run_cli("config", "--dataset", "digits", "--preset", "cpu", "--set", "pretext.epochs=7", "--seed", "4")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["pretext"]["epochs"] == 7 and cfg["runtime"]["seed"] == 4 and cfg["data"]["dataset"] == "digits"


def test_remote_download_stays_inside_its_folder(tmp_path):
    """An artifact name from the service cannot make `nnm remote download` write outside --out."""
    from nnm.cli.remote import RemoteError, safe_target

    assert safe_target(tmp_path, "model/model.pt") == tmp_path / "model" / "model.pt"
    for hostile in ("../escape.txt", "/etc/passwd", "a/../../b", "a\\..\\b", ""):
        with pytest.raises(RemoteError, match="not a relative path"):
            safe_target(tmp_path, hostile)


def test_remote_upload_zips_a_folder_with_its_layout(tmp_path):
    """Class folders and train/test splits survive; hidden files and folders are left out; JPEGs are
    stored as they are and raw formats compressed."""
    import zipfile

    from nnm.cli.remote import RemoteError, zip_folder

    src = tmp_path / "set"
    for rel in ("train/cat/1.jpg", "train/dog/2.png", "test/cat/3.bmp", ".hidden/4.png", "train/.DS_Store"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"\0" * 1000)
    assert zip_folder(src, tmp_path / "set.zip") == 3
    with zipfile.ZipFile(tmp_path / "set.zip") as zf:
        infos = {i.filename: i.compress_type for i in zf.infolist()}
    assert infos == {"test/cat/3.bmp": zipfile.ZIP_DEFLATED, "train/cat/1.jpg": zipfile.ZIP_STORED,
                     "train/dog/2.png": zipfile.ZIP_STORED}
    (tmp_path / "empty").mkdir()
    with pytest.raises(RemoteError, match="no files"):
        zip_folder(tmp_path / "empty", tmp_path / "e.zip")


def test_remote_watch_progress_counts_whole_stages():
    from nnm.cli.remote import overall_fraction

    stages = [{"name": n, "status": s} for n, s in (("pretext", "succeeded"), ("mine", "running"),
                                                     ("cluster", "pending"), ("selflabel", "pending"))]
    assert overall_fraction({"status": "running", "stages": stages, "progress": {"fraction": 0.5}}) == 0.375
    assert overall_fraction({"status": "queued", "stages": [], "progress": None}) == 0.0
    assert overall_fraction({"status": "succeeded", "stages": stages, "progress": None}) == 1.0
