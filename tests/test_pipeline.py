"""End to end on real images (scikit-learn digits): the pipeline beats k-means on pixels, its outputs
are complete, `nnm assign` and `nnm evaluate` agree with it, and the same seed gives the same metrics."""

import csv
import json

import numpy as np
import pytest
from conftest import png_bytes, run_cli, write_image_folder
from nnm.engine.data import load_dataset
from nnm.engine.metrics import accuracy_after_matching, match_clusters
from PIL import Image
from sklearn.cluster import KMeans

# A reduced version of the `cpu` preset, sized for CI (about two minutes on 2 cores). Ten clustering heads:
# with the preset's 3, this short run merged two digits on a Xeon with AMX (ACC 0.81) and not on an AMD
# EPYC; the lowest-loss of 10 heads avoids such partitions (docs/benchmarks.md, MNIST-5k).
TEST_BUDGET = ["--set", "pretext.epochs=60", "--set", "cluster.epochs=20", "--set", "selflabel.epochs=5",
               "--set", "cluster.heads=10"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-run")
    r = run_cli(
        "pipeline",
        "--dataset",
        "digits",
        "--preset",
        "cpu",
        "--seed",
        "0",
        "--quiet",
        "--out",
        str(out),
        *TEST_BUDGET,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def kmeans_on_pixels() -> tuple[float, float]:
    """ACC and NMI of k-means on the raw pixels of digits (the baseline of bench/kmeans_pixels.py)."""
    from sklearn.metrics import normalized_mutual_info_score

    data = load_dataset("digits")
    x = data.images.reshape(len(data), -1).float().numpy()
    y = data.labels.numpy()
    pred = KMeans(10, n_init=10, random_state=0).fit_predict(x)
    return accuracy_after_matching(pred, y, match_clusters(pred, y, 10, 10)), normalized_mutual_info_score(y, pred)


@pytest.mark.slow
def test_pipeline_beats_kmeans_on_pixels(trained):
    out, result = trained
    metrics = json.loads((out / "metrics.json").read_text())
    acc, nmi = kmeans_on_pixels()
    assert 0.7 < acc < 0.85 and 0.65 < nmi < 0.8
    # This short schedule (CI's) sometimes settles with two digits in one cluster, depending on the CPU's
    # kernels: ACC 0.84 on a Xeon without AMX (the 2s merged; NMI 0.87) where other machines reach 0.9 to
    # 0.99. So the clear margin is asked of NMI, which one merge moves little, and ACC must still win.
    assert metrics["nmi"] > nmi + 0.08, (metrics["nmi"], nmi)
    assert metrics["acc"] > acc + 0.03, (metrics["acc"], acc)
    assert {"acc", "nmi", "ari", "top5", "per_class_accuracy", "cluster_sizes", "timings"} <= metrics.keys()
    assert json.loads(result.stdout)["acc"] == metrics["acc"]


@pytest.mark.slow
def test_pipeline_outputs_are_complete(trained):
    out, _ = trained
    for name in ("confusion_matrix.png", "prototypes.png"):
        with Image.open(out / name) as im:
            im.load()
            assert im.size[0] > 100 and im.size[1] > 100
    cm = json.loads((out / "confusion_matrix.json").read_text())
    assert cm["class_names"] == [str(i) for i in range(10)]
    assert np.allclose(np.asarray(cm["matrix"]).sum(axis=1), 1.0)
    model = json.loads((out / "model" / "model.json").read_text())
    assert model["clusters"] == 10 and len(model["cluster_to_class"]) == 10
    protos = json.loads((out / "prototypes.json").read_text())["clusters"]
    assert len(protos) == 10 and all(p["images"] or p["size"] == 0 for p in protos)
    # The peak resident memory after each step only rises, and the run's peak is the last of them.
    metrics = json.loads((out / "metrics.json").read_text())
    after = metrics["memory"]["peak_rss_bytes_after"]
    assert list(after) == ["load", "pretext", "mine", "cluster", "selflabel", "evaluate"]
    assert list(after.values()) == sorted(after.values())
    assert after["load"] > 2**27 and after["evaluate"] < 2**34  # torch is loaded; digits need far less than 16 GiB
    assert metrics["memory"]["peak_rss_bytes"] == after["evaluate"]
    for stage in ("pretext", "mine", "cluster", "selflabel"):
        assert (out / stage / "done.json").exists()
        assert not (out / stage / "checkpoint.pt").exists()
    # The gallery agrees with the assignments, the prototypes and the mined neighbours.
    gallery = json.loads((out / "gallery" / "clusters.json").read_text())
    with open(out / "assignments.csv") as f:
        rows = list(csv.DictReader(f))
    index = np.load(out / "gallery" / "index.npz")
    assert gallery["num_images"] == len(rows) == 1797 and gallery["class_names"] == cm["class_names"]
    assert index["cluster"].tolist() == [int(r["cluster"]) for r in rows]
    assert [str(n) for n in index["name"]] == [r["image"] for r in rows]
    assert [c["size"] for c in gallery["clusters"]] == [p["size"] for p in protos]
    names = [[str(index["name"][i]) for i in c["prototypes"]] for c in gallery["clusters"]]
    assert names == [p["images"] for p in protos]
    mined = np.load(out / "mine" / "neighbors.npy")
    assert np.array_equal(index["neighbors"], mined[:, 1:11])  # column 0 of the mined ones is the image itself
    thumbs = np.load(out / "gallery" / "thumbnails.npy")
    side = gallery["thumbnail"]
    assert thumbs.shape == (1797, side, side, 1) and thumbs.dtype == np.uint8 and side <= 48


@pytest.mark.slow
def test_assign_agrees_with_the_pipeline(trained, tmp_path):
    from nnm.engine.data import resize_batch

    out, _ = trained
    data = load_dataset("digits")
    rows = list(csv.DictReader((out / "assignments.csv").open()))
    # The pipeline's own pixels: the 8x8 digits resized to the preset's 16 px as its loader does (PNGs of
    # the 8x8 originals would be resized by another filter in `nnm assign`, moving confidences by up to
    # 0.08 and an unsure image to another cluster).
    assert json.loads((out / "config.json").read_text())["data"]["image_size"] == 16
    small = resize_batch(data.images[:12], 16)
    files = []
    for i in range(12):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(small[i, 0].numpy()).save(path)
        files.append(str(path))
    r = run_cli("assign", "--model", str(out), *files)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["path"] for line in lines] == files
    # Same pixels -> same clusters and confidences as in training (assignments.csv keeps 4 decimals).
    assert [line["cluster"] for line in lines] == [int(rows[i]["cluster"]) for i in range(12)]
    assert [round(line["confidence"], 3) for line in lines] == pytest.approx(
        [float(rows[i]["confidence"]) for i in range(12)], abs=2e-3)
    assert all(0 < line["confidence"] <= 1 and line["class_name"] in data.class_names for line in lines)


@pytest.mark.slow
def test_evaluate_on_another_labelled_folder(trained, tmp_path):
    out, _ = trained
    data = load_dataset("digits")
    folder = write_image_folder(tmp_path / "held", data, count=300)
    r = run_cli("evaluate", "--model", str(out), "--dataset", str(folder), "--out", str(tmp_path / "ev"), "--quiet")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    train_metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 300
    assert abs(metrics["acc"] - train_metrics["acc"]) < 0.1  # these 300 are training images: same level
    assert (tmp_path / "ev" / "confusion_matrix.png").exists()


@pytest.mark.slow
def test_same_seed_same_metrics(tmp_path):
    args = ["--dataset", "digits", "--preset", "quick", "--seed", "7", "--quiet"]
    a = run_cli("pipeline", *args, "--out", str(tmp_path / "a"))
    b = run_cli("pipeline", *args, "--out", str(tmp_path / "b"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    for key in ("acc", "nmi", "ari", "cluster_sizes", "mean_confidence"):
        assert ma[key] == mb[key]


def test_split_folder_reports_the_test_split_and_keeps_the_training_figures(tmp_path, small_digits):
    """A zip with train/, test/ and unlabeled/: the pretext uses train+unlabeled, the headline figures are
    the test split's (the same as `nnm evaluate` on `ZIP:test`), and the training split's stay beside them."""
    import zipfile

    members = {}
    for i in range(len(small_digits)):
        arr = small_digits.images[i].numpy()[0]
        name = small_digits.class_names[int(small_digits.labels[i])]
        split = "train" if i % 4 else "test"  # 300 train, 100 test
        members[f"{split}/{name}/{i:04d}.png"] = png_bytes(arr)
        if i % 4 == 1:
            members[f"unlabeled/{i:04d}.png"] = png_bytes(arr)
    zpath = tmp_path / "split.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)
    out = tmp_path / "run"
    r = run_cli("pipeline", "--dataset", str(zpath), "--preset", "quick", "--quiet", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "test"
    assert metrics["num_images"] == 100 and metrics["dataset"] == f"{zpath}:test"
    assert metrics["train"]["num_images"] == 300 and metrics["train"]["dataset"] == f"{zpath}:train"
    train = json.loads((out / "train_metrics.json").read_text())
    assert metrics["train"]["acc"] == train["acc"] and metrics["train"]["nmi"] == train["nmi"]
    with open(out / "assignments.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100 and all(row["image"].startswith("test/") for row in rows)
    with open(out / "train_assignments.csv") as f:
        assert sum(1 for _ in csv.DictReader(f)) == 300
    # The gallery shows the clustered (training) images: the ones with mined neighbours.
    gallery = json.loads((out / "gallery" / "clusters.json").read_text())
    assert gallery["num_images"] == 300 and sum(c["size"] for c in gallery["clusters"]) == 300
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["pretext_split"] == "train+unlabeled"
    pretext = json.loads((out / "pretext" / "done.json").read_text())
    assert pretext["fingerprint"]["data"]["shape"][0] == 300 + 100
    r = run_cli("evaluate", "--model", str(out / "model"), "--dataset", f"{zpath}:test", "--out", str(tmp_path / "ev"),
                "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["acc"] == pytest.approx(metrics["acc"]) and again["num_images"] == 100


@pytest.mark.slow
def test_fast_preset_runs_on_a_96px_folder_of_20_classes(tmp_path, digits):
    """The `fast` preset (made for one GPU) on another shape of data, at small scale on this CPU: 40 RGB
    images of 96 px in 20 classes (digits 0-9, each in two tints), its schedules cut to one epoch each."""
    root = tmp_path / "stl-like"
    seen = [0] * 10
    for i in range(40):
        digit = int(digits.labels[i])
        tint, seen[digit] = seen[digit] % 2, seen[digit] + 1  # every digit has at least 3: both tints
        gray = np.asarray(Image.fromarray(digits.images[i, 0].numpy()).resize((96, 96), Image.BILINEAR))
        rgb = np.stack([gray, gray // 2, gray // 3] if tint else [gray // 3, gray, gray // 2], axis=2)
        folder = root / f"{digit}-{'ab'[tint]}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.png").write_bytes(png_bytes(rgb.astype(np.uint8)))
    classes = {p.name for p in root.iterdir()}
    assert len(classes) == 20
    out = tmp_path / "run"
    r = run_cli("pipeline", "--dataset", str(root), "--preset", "fast", "--device", "cpu", "--quiet", "--out", str(out),
                "--set", "pretext.epochs=1", "--set", "cluster.epochs=1", "--set", "selflabel.epochs=1", timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["pretext"]["backbone"]["arch"] == "resnet18-stl"
    assert json.loads((out / "model" / "model.json").read_text())["image_size"] == 96
    assert config["cluster"]["clusters"] is None and config["cluster"]["batch_size"] == 512  # more than the data
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 40 and len(metrics["cluster_sizes"]) == len(classes)
    assert 0 < metrics["acc"] <= 1 and sum(metrics["cluster_sizes"]) == 40


def test_auto_clusters_on_a_flat_folder(tmp_path, small_digits):
    """A folder without class folders runs with `--clusters auto` only: the estimate decides K, the model,
    the metrics and the gallery follow it, and without `auto` the run is refused with the way out named."""
    folder = write_image_folder(tmp_path / "flat", small_digits, labelled=False)
    out = tmp_path / "run"
    refused = run_cli("pipeline", "--dataset", str(folder), "--preset", "quick", "--quiet", "--out", str(out))
    assert refused.returncode == 2 and "--clusters auto" in refused.stderr
    r = run_cli("pipeline", "--dataset", str(folder), "--preset", "quick", "--quiet", "--out", str(out),
                "--clusters", "auto", "--min-clusters", "3", "--max-clusters", "25", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    est = json.loads((out / "estimate" / "estimate.json").read_text())
    k = est["clusters"]
    assert 3 <= k <= 25 and (est["min_clusters"], est["max_clusters"]) == (3, 25)
    assert set(est["curve"]) == {str(i) for i in range(3, 26)} and "num_classes" not in est
    # The smallest K within two standard errors of the highest score (the default rule); the highest is
    # kept, with the error of every K and the tolerance it came to.
    curve, top = {int(c): v for c, v in est["curve"].items()}, max(est["curve"].values())
    assert curve[est["best_scoring"]] == top and est["rule"] == "standard_error" and est["standard_errors"] == 2.0
    assert set(est["standard_error"]) == set(est["curve"]) and all(e > 0 for e in est["standard_error"].values())
    assert est["tolerance"] == pytest.approx(2 * est["standard_error"][str(est["best_scoring"])])
    assert k == min(c for c, v in curve.items() if v >= top - est["tolerance"]) and k <= est["best_scoring"]
    assert (out / "estimate" / "curve.png").stat().st_size > 1000
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["estimated_clusters"] == {"clusters": k, "criterion": "modularity", "min_clusters": 3,
                                             "max_clusters": 25}
    assert "acc" not in metrics and len(metrics["cluster_sizes"]) == k
    assert json.loads((out / "model" / "model.json").read_text())["clusters"] == k
    assert json.loads((out / "cluster" / "meta.json").read_text())["clusters"] == k
    assert json.loads(r.stdout)["estimated_clusters"]["clusters"] == k
    bad = run_cli("pipeline", "--dataset", str(folder), "--preset", "quick", "--quiet", "--out", str(tmp_path / "x"),
                  "--clusters", "many")
    assert bad.returncode == 2 and "expected a number of clusters or 'auto'" in bad.stderr
