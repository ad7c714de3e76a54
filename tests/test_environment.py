"""The conda environment and the pip route pin the same versions."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    pins = {}
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==?\s*([^\s#;]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_environment_yml_matches_constraints():
    constraints = _pins((ROOT / "constraints.txt").read_text().splitlines())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    named = _pins(pip) | {k.replace("pytorch", "torch"): v for k, v in _pins(conda).items()}
    required = _pins((ROOT / "requirements.txt").read_text().splitlines())
    direct = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    direct = {re.split(r"[=<>\s]", d)[0].lower().replace("_", "-") for d in direct if d}
    assert direct <= set(named), f"environment.yml lacks {direct - set(named)}"
    for name, version in named.items():
        if name in constraints:
            assert version == constraints[name], f"{name}: environment.yml {version} != constraints {constraints[name]}"
    for name, version in required.items():
        assert constraints[name] == version, f"{name}: requirements {version} != constraints {constraints[name]}"
