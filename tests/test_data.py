"""Input pipeline tests on real files written here with PIL, mocked TFDS, and the demo data."""

import math
import os
import subprocess
import sys
from unittest import mock

import numpy as np
from PIL import Image
import pytest

# torchvision before TensorFlow: importing it after TensorFlow segfaults (torchvision 0.29, TF 2.21).
import torch
from torchvision import transforms as tv
import tensorflow as tf  # pylint: disable=g-bad-import-order
import tensorflow_datasets as tfds

from kdep_jax import config_lib, data
from conftest import REPO
from tiny_images import TinyImages
from kdep_jax.data import demo, transforms

MEAN, STD = np.array(data.IMAGENET_MEAN), np.array(data.IMAGENET_STD)
CLASSES = ("cat", "dog", "eel")


def test_tensorflow_loads_with_the_input_pipeline_only():
    """TensorFlow takes 0.5 GiB and seconds to import: a process that builds models, converts weights, loads
    checkpoints or times the step (benchmarks/distill_step.py) does not load it until it reads data."""
    code = ("import sys, kdep_jax.main, kdep_jax.convert, kdep_jax.teacher, kdep_jax.distill\n"
            "print(sorted(name for name in sys.modules\n"
            "             if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))\n"
            "from kdep_jax import data\n"
            "data.dataset_info\n"
            "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "True"], result.stdout + result.stderr


def test_pipelines_map_their_functions_as_written(tmp_path):
    """Not through AutoGraph, which would rewrite them (1.2 s before a process's first batches) and write their
    source to the temporary directory, where a killed run leaves it."""
    code = ("import os, runpy\n"
            "from kdep_jax import data\n"
            "config = runpy.run_path('configs/demo.py')['get_config']('tiny').data\n"
            "next(data.train_batches(config, config.split, 32, seed=0))\n"
            "next(data.eval_batches(config, config.split, 32))\n"
            "os._exit(0)  # as a killed run: no exit handlers\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "TMPDIR": str(tmp_path)}, check=True,
                   capture_output=True)
    assert not list(tmp_path.glob("__autograph_generated_file*"))


def _smooth(rng, h, w):
    """A smooth random RGB image (a few low-frequency waves), so resampling differences stay small."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    out = sum(
        np.sin(2 * np.pi * (rng.uniform(0, 2) * x + rng.uniform(0, 2) * y + rng.uniform()))[..., None]
        * rng.uniform(-1, 1, 3)
        for _ in range(3)
    )
    return np.clip(128 + 40 * out, 0, 255).astype(np.uint8)


def _save(img, path, fmt):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, fmt)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/{train,val}/{cat,dog,eel}: JPEG and PNG files of varied sizes, including grayscale, CMYK, RGBA
    and palette images. Every image is a uniform colour that encodes its id, so batches can be traced."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 8), ("val", 5)):
        for c, name in enumerate(CLASSES):
            for k in range(per_class):
                i = c * per_class + k + (0 if split == "train" else 30)
                h, w = rng.integers(20, 48, 2)
                img = Image.new("RGB", (int(w), int(h)), (4 * i, 0, 0))
                _save(img, f"{root}/{split}/{name}/{k:02d}.png", "PNG")
    # Other formats, not uniform: check they decode to RGB (the colour-id trick is not used on them).
    formats = tmp_path_factory.mktemp("formats")
    base = Image.fromarray(_smooth(rng, 30, 40))
    _save(base.convert("L"), f"{formats}/train/a/gray.jpg", "JPEG")
    _save(base.convert("CMYK"), f"{formats}/train/a/cmyk.jpg", "JPEG")
    _save(base.convert("RGBA"), f"{formats}/train/b/rgba.png", "PNG")
    _save(base.convert("P"), f"{formats}/train/b/palette.png", "PNG")
    return str(root), str(formats)


def _cfg(name="image_folder", data_dir=None, size=16, **kw):
    cfg = config_lib.data_config()
    cfg.name, cfg.data_dir, cfg.image_size, cfg.split, cfg.eval_split = name, data_dir, size, "train", "val"
    cfg.update(kw)
    return cfg


def _ids(images):
    """Example ids from uniform-colour images: the red channel is 4 * id."""
    red = (images[..., 0] * STD[0] + MEAN[0]) * 255
    assert np.allclose(red, red[:, :1, :1], atol=1e-2)  # still uniform after crop/resize/flip
    return np.round(red[:, 0, 0] / 4).astype(int)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_batches_shapes_dtypes_ranges(folder):
    cfg = _cfg(data_dir=folder[0])
    batch = next(data.train_batches(cfg, "train", 6, seed=0, process_index=0, process_count=1))
    assert batch["image"].shape == (6, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (6,) and batch["label"].dtype == np.int32
    assert np.all((batch["label"] >= 0) & (batch["label"] < 3))
    lo, hi = -MEAN / STD, (1 - MEAN) / STD
    assert np.all(batch["image"] >= lo - 1e-5) and np.all(batch["image"] <= hi + 1e-5)
    # Labels follow the class folders (ids 0-7 are "cat", 8-15 "dog", 16-23 "eel").
    np.testing.assert_array_equal(batch["label"], _ids(batch["image"]) // 8)
    assert data.dataset_info(cfg, "train") == data.DatasetInfo(24, 3)


def test_train_deterministic_resumable_and_epochs_complete(folder):
    cfg = _cfg(data_dir=folder[0])
    run = lambda seed, start=0: _take(data.train_batches(cfg, "train", 6, seed, start, 0, 1), 8 - start)
    a, b = run(1), run(1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
    for x, y in zip(a[3:], run(1, start=3)):  # resume: exactly the batches 3, 4, ... of a fresh run
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["image"], run(2)[0]["image"])
    ids = [_ids(x["image"]) for x in a]
    assert sorted(np.concatenate(ids[:4])) == list(range(24))  # epoch 0: 4 steps, each example once
    assert sorted(np.concatenate(ids[4:])) == list(range(24))  # epoch 1: a new order
    assert not np.array_equal(np.concatenate(ids[:4]), np.concatenate(ids[4:]))


@pytest.mark.parametrize("count", [2, 3])
def test_train_sharding_concatenates_to_the_one_process_batch(folder, count):
    cfg = _cfg(data_dir=folder[0])
    single = _take(data.train_batches(cfg, "train", 6, 5, 2, 0, 1), 3)
    shards = [_take(data.train_batches(cfg, "train", 6, 5, 2, p, count), 3) for p in range(count)]
    for step in range(3):
        parts = [shard[step] for shard in shards]
        assert all(part["image"].shape[0] == 6 // count for part in parts)
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), single[step][key])
        ids = [set(_ids(part["image"])) for part in parts]
        assert sum(map(len, ids)) == 6 and len(set.union(*ids)) == 6  # disjoint


@pytest.mark.parametrize("count", [1, 2, 3])
def test_eval_covers_every_example_once_with_padding_mask(folder, count):
    cfg = _cfg(data_dir=folder[0])
    runs = [list(data.eval_batches(cfg, "val", 6, p, count)) for p in range(count)]
    assert {len(r) for r in runs} == {3}  # ceil(15 / 6) on every process
    seen = []
    for p, run in enumerate(runs):
        for b, batch in enumerate(run):
            assert batch["image"].shape == (6 // count, 16, 16, 3) and batch["mask"].dtype == bool
            positions = b * 6 + p * (6 // count) + np.arange(6 // count)
            np.testing.assert_array_equal(batch["mask"], positions < 15)
            assert np.all(batch["image"][~batch["mask"]] == 0)
            seen += list(_ids(batch["image"][batch["mask"]]))
            np.testing.assert_array_equal(
                batch["label"][batch["mask"]], (_ids(batch["image"][batch["mask"]]) - 30) // 5
            )
    assert sorted(seen) == list(range(30, 45))
    aug = next(data.eval_batches(cfg, "val", 6, 0, 1, augment_seed=3))
    assert aug["image"].shape == (6, 16, 16, 3) and aug["mask"].all()


@pytest.mark.parametrize(
    "h,w,size,ratio,interpolation",
    [(37, 53, 16, 256 / 224, "bilinear"), (60, 41, 16, 256 / 224, "bilinear"), (30, 30, 24, 256 / 224, "bilinear"),
     (19, 25, 32, 256 / 224, "bilinear"), (61, 47, 28, 232 / 224, "bicubic")],  # the last: Swin_T_Weights' transform
)
def test_eval_transform_matches_torchvision(h, w, size, ratio, interpolation):
    image = _smooth(np.random.default_rng(h), h, w)
    ours = transforms.eval_transform(tf.constant(image), size, ratio, interpolation).numpy()
    mode = {"bilinear": tv.InterpolationMode.BILINEAR, "bicubic": tv.InterpolationMode.BICUBIC}[interpolation]
    ref = tv.Compose(
        [
            tv.Resize(round(size * ratio), interpolation=mode),
            tv.CenterCrop(size),
            tv.ToTensor(),
            tv.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD),
        ]
    )(Image.fromarray(image))
    ref = ref.permute(1, 2, 0).numpy()
    assert ours.shape == ref.shape == (size, size, 3)
    assert np.abs((ours - ref) * STD).max() * 255 < 3  # within 3 grey levels of PIL's resampling


def test_random_resized_crop_box_statistics_match_torchvision():
    boxes = tf.function(
        lambda seeds: tf.map_fn(
            lambda s: tf.stack(transforms.random_resized_crop_box(40, 60, s)), seeds, fn_output_signature=tf.int32
        )
    )
    n = 3000
    ours = boxes(tf.stack([tf.range(n, dtype=tf.int64), tf.zeros(n, tf.int64)], 1)).numpy()
    torch.manual_seed(0)
    ref = np.array(
        [tv.RandomResizedCrop.get_params(torch.zeros(3, 40, 60), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    )
    for boxes_ in (ours, ref):
        top, left, h, w = boxes_.T
        assert np.all((top >= 0) & (left >= 0) & (top + h <= 40) & (left + w <= 60) & (h > 0) & (w > 0))
    stats = lambda b: np.stack([b[:, 2] * b[:, 3] / 2400, np.log(b[:, 3] / b[:, 2]), b[:, 0], b[:, 1]], 1)
    s_ours, s_ref = stats(ours), stats(ref)
    assert s_ours[:, 0].min() >= 0.07 and s_ours[:, 0].max() <= 1
    assert np.all(np.abs(s_ours[:, 1]) <= math.log(4 / 3) + 0.1)
    se = np.sqrt(s_ours.var(0) / n + s_ref.var(0) / n)
    assert np.all(np.abs(s_ours.mean(0) - s_ref.mean(0)) < 4 * se), (s_ours.mean(0), s_ref.mean(0))
    # An image too elongated for any candidate: torchvision's deterministic centre-crop fallback.
    fallback = [int(v) for v in transforms.random_resized_crop_box(10, 200, tf.constant([0, 0], tf.int64))]
    assert fallback == list(tv.RandomResizedCrop.get_params(torch.zeros(3, 10, 200), [0.08, 1.0], [3 / 4, 4 / 3]))


def test_grayscale_cmyk_rgba_palette_become_rgb(folder):
    root = folder[1]
    for path in tf.io.gfile.glob(f"{root}/train/*/*"):
        ours = transforms.decode(tf.io.read_file(path)).numpy()
        ref = np.asarray(Image.open(path).convert("RGB"))
        assert ours.shape == ref.shape and np.abs(ours.astype(int) - ref).max() <= 3, path
    batch = next(data.train_batches(_cfg(data_dir=root), "train", 4, 0, 0, 0, 1))
    assert batch["image"].shape == (4, 16, 16, 3) and np.isfinite(batch["image"]).all()


def test_subset_fraction_and_per_class(folder):
    cfg = _cfg(data_dir=folder[0], subset=0.5, subset_seed=1)
    assert data.dataset_info(cfg, "train").num_examples == 12
    assert data.dataset_info(cfg, "val").num_examples == 15  # evaluation is never subsetted
    ids = lambda c: set(
        np.concatenate([_ids(b["image"]) for b in _take(data.train_batches(c, "train", 6, 0, 0, 0, 1), 2)])
    )
    chosen = ids(cfg)
    assert len(chosen) == 12 and chosen == ids(_cfg(data_dir=folder[0], subset=0.5, subset_seed=1))
    assert chosen != ids(_cfg(data_dir=folder[0], subset=0.5, subset_seed=2))
    per_class = _cfg(data_dir=folder[0], subset=2)
    assert data.dataset_info(per_class, "train").num_examples == 6
    batch = next(data.train_batches(per_class, "train", 6, 0, 0, 0, 1))
    assert sorted(batch["label"]) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(data.DataError, match="subset"):
        data.dataset_info(_cfg(data_dir=folder[0], subset=1.5), "train")


def test_rest_split_is_the_complement_of_the_subset(folder):
    cfg = _cfg(data_dir=folder[0], subset=3, eval_split="train:rest")
    assert data.dataset_info(cfg, "train:rest").num_examples == 15
    chosen = set(_ids(next(data.train_batches(cfg, "train", 9, 0, 0, 0, 1))["image"]))
    rest = set(np.concatenate([_ids(b["image"][b["mask"]]) for b in data.eval_batches(cfg, "train:rest", 4)]))
    assert len(chosen) == 9 and len(rest) == 15 and not chosen & rest and chosen | rest == set(range(24))
    with pytest.raises(data.DataError, match="config.data.subset"):
        data.dataset_info(_cfg(data_dir=folder[0]), "train:rest")


@pytest.fixture()
def corrupt_folder(tmp_path):
    for k in range(4):
        _save(Image.new("RGB", (20, 20), (k, 0, 0)), f"{tmp_path}/train/a/{k}.jpg", "JPEG")
    good = (tmp_path / "train/a/0.jpg").read_bytes()
    (tmp_path / "train/a/truncated.jpg").write_bytes(good[: len(good) // 2])
    return str(tmp_path)


def test_corrupt_file_is_named_or_skipped(corrupt_folder):
    with pytest.raises(data.DataError, match=r"truncated\.jpg.*skip_corrupt") as error:
        _take(data.train_batches(_cfg(data_dir=corrupt_folder), "train", 5, 0, 0, 0, 1), 2)
    assert "{{" not in str(error.value), error.value  # TensorFlow's node names are not for people
    cfg = _cfg(data_dir=corrupt_folder, skip_corrupt=True)
    assert data.dataset_info(cfg, "train") == data.DatasetInfo(4, 1, num_skipped=1)
    assert len(_take(data.train_batches(cfg, "train", 4, 0, 0, 0, 1), 3)) == 3


@pytest.mark.parametrize("threads", [3, None])
def test_pipelines_run_without_tf_data_autotuning(corrupt_folder, threads, monkeypatch):
    """Every pipeline's iterator (training, evaluation, skip_corrupt's check) has autotuning off, whose model thread
    can hold up an iterator's deletion for half a minute (`data.pipeline.dataset_options`), and its parallel maps
    on all the pool's threads."""
    seen = []
    as_numpy_iterator = tf.data.Dataset.as_numpy_iterator

    def recording(self):
        seen.append(self.options())
        return as_numpy_iterator(self)

    monkeypatch.setattr(tf.data.Dataset, "as_numpy_iterator", recording)
    cfg = _cfg(data_dir=corrupt_folder, eval_split="train", skip_corrupt=True, threads=threads)
    next(data.train_batches(cfg, "train", 2, 0, 0, 0, 1))
    next(data.eval_batches(cfg, "train", 2, 0, 1))
    assert len(seen) == 3
    for options in seen:
        assert options.deterministic and options.autotune.enabled is False
        assert options.autotune.initial_parallelism == (threads or os.cpu_count())
        assert options.threading.private_threadpool_size == threads


def test_bad_folders_and_settings(tmp_path, folder):
    cases = [(_cfg(data_dir=str(tmp_path / "missing")), "does not exist"), (_cfg(data_dir=None), "data_dir")]
    (tmp_path / "empty/train").mkdir(parents=True)
    cases.append((_cfg(data_dir=str(tmp_path / "empty")), "is empty"))
    (tmp_path / "noimg/train/a").mkdir(parents=True)
    (tmp_path / "noimg/train/a/notes.txt").write_text("x")
    cases.append((_cfg(data_dir=str(tmp_path / "noimg")), r"train/a has no images"))
    for cfg, message in cases:
        with pytest.raises(data.DataError, match=message):
            data.dataset_info(cfg, "train")
    with pytest.raises(data.DataError, match="not divisible by the process count 4"):
        data.train_batches(_cfg(data_dir=folder[0]), "train", 6, 0, 0, 0, 4)
    with pytest.raises(data.DataError, match="fewer than the global batch"):
        next(data.train_batches(_cfg(data_dir=folder[0]), "train", 48, 0, 0, 0, 1))
    with pytest.raises(data.DataError, match="demo data has no split"):
        data.dataset_info(_cfg(name="demo"), "train")


def test_tfds_not_prepared_says_how(tmp_path):
    with pytest.raises(data.DataError, match=r"not prepared.*\n  tfds build cifar100 --data_dir="):
        data.dataset_info(_cfg(name="cifar100", data_dir=str(tmp_path)), "train")
    cfg = _cfg(name="imagenet2012_subset/10pct", data_dir=str(tmp_path), manual_dir="/tars")
    with pytest.raises(data.DataError, match=r"(?s)ILSVRC2012_img_train\.tar.*manual_dir.*--manual_dir=/tars"):
        data.dataset_info(cfg, "train")


def test_tfds_random_access_with_mock_data():
    cfg = _cfg(name="mnist", data_dir="/nonexistent", size=16)  # mnist: 28x28 grayscale, 10 classes
    with (
        tfds.testing.mock_data(num_examples=20),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
    ):
        assert data.dataset_info(cfg, "train") == data.DatasetInfo(20, 10)
        single = _take(data.train_batches(cfg, "train", 4, 0, 0, 0, 1), 6)
        halves = [_take(data.train_batches(cfg, "train", 4, 0, 0, p, 2), 6) for p in range(2)]
        evals = list(data.eval_batches(cfg, "train", 6, 0, 1))
    for step, batch in enumerate(single):
        assert batch["image"].shape == (4, 16, 16, 3) and np.all(batch["label"] < 10)
        np.testing.assert_array_equal(np.concatenate([h[step]["image"] for h in halves]), batch["image"])
    assert len(evals) == 4 and sum(int(b["mask"].sum()) for b in evals) == 20


def test_demo_source():
    cfg = config_lib.data_config()
    cfg.image_size, cfg.split, cfg.eval_split = 32, "downstream_train", "downstream_test"
    info = data.dataset_info(cfg, "downstream_train")
    assert info == data.DatasetInfo(demo.num_examples("downstream_train"), demo.num_classes("downstream_train"))
    batch = next(data.train_batches(cfg, "downstream_train", 8, 0, 0, 0, 1))
    assert batch["image"].shape == (8, 32, 32, 3) and np.all(batch["label"] < info.num_classes)
    images, labels = demo.load("downstream_test", image_size=32, seed=0)
    first = next(data.eval_batches(cfg, "downstream_test", 8, 0, 1))
    reference = tv.Compose([tv.Resize(37), tv.CenterCrop(32), np.asarray])  # 37 = round(32 * 256 / 224)
    ref = np.stack([reference(Image.fromarray(image)) for image in images[:8]])
    assert np.abs((first["image"] * STD + MEAN) * 255 - ref).max() < 3
    np.testing.assert_array_equal(first["label"], labels[:8])


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_prepared_dataset(tmp_path, file_format):
    TinyImages(data_dir=str(tmp_path), file_format=file_format).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    cfg = _cfg(name="tiny_images", data_dir=str(tmp_path), split="train")
    assert data.dataset_info(cfg, "train") == data.DatasetInfo(11, 3, random_access=file_format == "array_record")
    seen = []
    for p in range(2):  # TFRecord: per-process shards of 6 and 5 examples, padded to the same 3 batches
        batches = list(data.eval_batches(cfg, "train", 4, p, 2))
        assert len(batches) == 3
        for batch in batches:
            ids = _ids(batch["image"][batch["mask"]])
            np.testing.assert_array_equal(batch["label"][batch["mask"]], ids // 4)
            seen += list(ids)
    assert sorted(seen) == list(range(11))
    batch = next(data.train_batches(cfg, "train", 4, 0, 0, 1, 2))
    assert batch["image"].shape == (2, 16, 16, 3)
