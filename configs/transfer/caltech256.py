"""Transfer to Caltech-256 from an image folder with the usual 60 training images per class.

Lay the images out as ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg (or use the whole set as
ROOT/all/<class>/ with config.data.subset=60 for a seeded 60-per-class training split), then:
python -m kdep_jax.main --config=configs/transfer/caltech256.py --workdir=runs/c256 \
    --config.data.data_dir=ROOT --config.init=kdep:runs/r18
"""
from kdep_jax import config_lib


def get_config():
    config = config_lib.supervised_config()
    config.name = "caltech256"
    config.data.name = "image_folder"
    config.data.split = "train"
    config.data.eval_split = "test"
    config.data.subset = 60
    return config
