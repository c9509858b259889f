"""Test-suite settings and the tiny DiT pipelines several test modules share.

The tiny models run fastest on one thread (and do not fight other processes). Each pipeline fixture is
module-scoped: a module's tests share one build, and no module sees another's leftovers.
"""

import logging

import pytest
import torch

from diffadapt.testing import tiny_dit_pipeline, tiny_flux_pipeline, tiny_qwen_image_pipeline, tiny_wan_pipeline

torch.set_num_threads(1)
logging.getLogger("diffusers").setLevel(logging.ERROR)  # the tiny DiT configs draw size warnings


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


@pytest.fixture(scope="module")
def sd3():
    return tiny_dit_pipeline()


@pytest.fixture(scope="module")
def wan():
    return tiny_wan_pipeline()


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen_image_pipeline()
