"""The vLLM plugin's registration, checked without vLLM (tests/test_vllm.py runs the model in vLLM)."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

import slicegpt.vllm_plugin as plugin
from slicegpt.architectures.families import FAMILIES
from slicegpt.io.checkpoint import sliced_architecture

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


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


def test_the_vllm_extra_asks_for_the_version_the_plugin_was_tested_with():
    """bench/vllm_env.sh installs the vLLM that tests/test_vllm.py runs the plugin in; an older
    one lacks the model interface the plugin uses."""
    script = (ROOT / "bench" / "vllm_env.sh").read_text()
    tested = Version(re.search(r"VLLM_VERSION=\$\{VLLM_VERSION:-([0-9.]+)\}", script)[1])
    extra = [Requirement(r) for r in tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["vllm"]]
    (floor,) = [spec.version for r in extra if r.name == "vllm" for spec in r.specifier if spec.operator == ">="]
    assert Version(floor).release[:2] == tested.release[:2]
    assert f"tested with vLLM {tested}" in (ROOT / "README.md").read_text()
