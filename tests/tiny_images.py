"""A TFDS dataset that the input-pipeline tests prepare offline (TensorFlow is imported only by the tests that use
it)."""
import numpy as np
import tensorflow_datasets as tfds


class TinyImages(tfds.core.GeneratorBasedBuilder):
    """A real (not mocked) TFDS dataset of 11 uniform-colour images, prepared offline by the test."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=3)}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(11):
            yield i, {"image": np.full((20 + i, 30, 3), 4 * i, np.uint8), "label": i // 4}
