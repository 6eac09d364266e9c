"""The vLLM plugin's registration, checked without vLLM (tests/test_vllm.py runs the model in vLLM)."""

import tomllib
from pathlib import Path

import slicegpt.vllm_plugin as plugin
from slicegpt.architectures.families import FAMILIES
from slicegpt.io.checkpoint import sliced_architecture

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_the_plugin_registers_the_names_sliced_directories_give():
    names = plugin.sliced_architectures()
    assert names == [sliced_architecture({"base_architecture": base}) for base in plugin.BASE_ARCHITECTURES]
    assert all(base in FAMILIES for base in plugin.BASE_ARCHITECTURES)


def test_vllm_finds_the_plugin_through_its_entry_point():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"]["slicegpt"] == "slicegpt.vllm_plugin:register"
    module, _, function = plugin.MODEL_CLASS.partition(":")
    assert module == "slicegpt.vllm_plugin.model" and function == "SlicedForCausalLM"
    assert callable(plugin.register)
