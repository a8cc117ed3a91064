"""Transfer to Caltech-256 from an image folder with the usual 60 training images per class.

Extract 256_ObjectCategories.tar into ROOT (giving ROOT/256_ObjectCategories/<class>/*.jpg, 257 classes with
clutter). Training uses 60 images per class chosen with config.data.subset_seed; the test set is every image
left out (the split "256_ObjectCategories:rest"); config.seed varies the run, not the split:
python -m kdep_jax.main --config=configs/transfer/caltech256.py --workdir=runs/c256 \
    --config.data.data_dir=ROOT --config.init=kdep:runs/r18
"""
from kdep_jax import config_lib


def get_config():
    config = config_lib.supervised_config()
    config.name = "caltech256"
    config.data.name = "image_folder"
    config.data.split = "256_ObjectCategories"
    config.data.eval_split = "256_ObjectCategories:rest"
    config.data.subset = 60
    return config
