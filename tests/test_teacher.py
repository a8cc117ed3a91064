"""The teacher's forward pass in chunks: what the whole batch at once gives, sharded as the batch, and its default."""
import re

import jax
import numpy as np
import pytest

from conftest import tiny_config
from kdep_jax import parallel, trainer, validation
from kdep_jax import teacher as teacher_lib
from kdep_jax.errors import ConfigError

AMX_CPU = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n"
AVX512_CPU = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 fma avx512f avx512_bf16\n"


@pytest.mark.parametrize("arch, size, setting, backend, cpuinfo, expected", [
    ("vit_b_16", 224, None, "cpu", AMX_CPU, 0),  # its Linear layers by kdep_jax's kernel: faster whole
    ("swin_t", 224, None, "cpu", AMX_CPU, 4),
    ("convnext_tiny", 224, None, "cpu", AMX_CPU, 4),
    ("efficientnet_lite0", 224, None, "cpu", AMX_CPU, 4),
    ("swin_t", 384, None, "cpu", AMX_CPU, 1),  # as many pixels as 4 images of 224 px, at least one image
    ("swin_t", 32, None, "cpu", AMX_CPU, 196),  # the demo's batches of 32 px images go whole
    ("resnet50", 224, None, "cpu", AMX_CPU, 0),  # slower in chunks
    ("swin_t", 224, None, "cpu", AVX512_CPU, 0),  # not measured there
    ("vit_b_16", 224, None, "gpu", AMX_CPU, 0),
    ("vit_b_16", 224, 0, "cpu", AMX_CPU, 0),
    ("resnet50", 224, 8, "gpu", AVX512_CPU, 8),
])
def test_the_chunk_is_the_setting_or_the_measured_default(arch, size, setting, backend, cpuinfo, expected):
    config = tiny_config(**{"teacher.arch": arch, "teacher.forward_chunk": setting})
    assert teacher_lib.forward_chunk(config, size * size, backend, cpuinfo) == expected


def test_a_negative_chunk_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="config.teacher.forward_chunk=-1 is negative.*0 for the whole batch"):
        validation.validate(tiny_config(**{"teacher.forward_chunk": -1}), 4, 1, tmp_path)


def test_the_teachers_dtype_is_its_own_or_the_runs_and_a_wrong_one_is_refused(tmp_path):
    """config.teacher.dtype sets the teacher's compute dtype (its model, and what its passes' files record) apart
    from the student's; unset, it is config.dtype."""
    config = tiny_config(**{"dtype": "float32", "teacher.dtype": "bfloat16"})
    assert teacher_lib.model(config).dtype == np.dtype("bfloat16")
    teacher = teacher_lib.Teacher({}, "sha", None)
    assert teacher_lib.data_provenance(config, teacher, config.data)["dtype"] == "bfloat16"
    config.teacher.dtype = None
    assert teacher_lib.model(config).dtype == np.dtype("float32")
    assert teacher_lib.data_provenance(config, teacher, config.data)["dtype"] == "float32"
    with pytest.raises(ConfigError, match="config.teacher.dtype='float16': use one of float32, bfloat16, or leave it "
                                          "unset for config.dtype"):
        validation.validate(tiny_config(**{"teacher.dtype": "float16"}), 4, 1, tmp_path)


@pytest.fixture(scope="module")
def tiny_vit_teacher():
    config = tiny_config("tiny_vit")
    size = config.data.image_size
    variables = trainer.init_variables(teacher_lib.model(config, num_classes=10), size, seed=0)
    images = np.random.default_rng(0).normal(size=(16, size, size, 3)).astype(np.float32)
    return config, variables, images


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunks_give_the_whole_batchs_outputs_without_moving_rows_between_devices(tiny_vit_teacher, chunk):
    """16 images over 4 devices in chunks of at most `chunk` per device (1 -> 4 chunks, 3 -> 2 chunks of 2): every
    output row is the whole batch's, and the compiled program loops over the chunks with no collective in it."""
    config, variables, images = tiny_vit_teacher
    mesh = parallel.make_mesh()
    variables = parallel.replicate(variables, mesh)
    sharded = parallel.shard_batch({"image": images}, mesh)["image"]

    def compiled(setting):
        config.teacher.forward_chunk = setting
        outputs = teacher_lib.outputs_fn(config, ("logits", "pre_relu"), num_classes=10)
        return jax.jit(outputs, out_shardings=parallel.batch_sharding(mesh)).lower(variables, sharded).compile()

    whole, chunked = compiled(0), compiled(chunk)
    assert "while" not in whole.as_text() and "while" in chunked.as_text()
    assert collectives(chunked) <= collectives(whole)  # the model's own: a flag reduced over the batch (GELU's)
    expected, outputs = whole(variables, sharded), chunked(variables, sharded)
    for name in ("logits", "pre_relu"):
        np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-5, atol=1e-5 * np.abs(expected[name]).max())


def collectives(compiled) -> set[tuple[str, str]]:
    """(shape, op) of each cross-device operation in a compiled program."""
    return set(re.findall(r"= (\S+) (all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)\(",
                          compiled.as_text()))
