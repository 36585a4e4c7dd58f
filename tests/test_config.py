"""Config conversion: unknown keys and wrong types fail loudly, overrides apply, round trips are exact.

Run: pytest tests/test_config.py
"""

from dataclasses import dataclass, field

import pytest

from dsdm.config import apply_overrides, from_dict, load_config, save_config, to_dict


@dataclass
class Inner:
    proj_dim: int = 64
    """k."""
    dtype: str = "float16"


@dataclass
class Outer:
    name: str = "x"
    lr: float = 1e-3
    seeds: list[int] = field(default_factory=lambda: [0])
    inner: Inner = field(default_factory=Inner)
    path: str | None = None


def test_from_dict_builds_nested_and_coerces_int_to_float():
    cfg = from_dict(Outer, {"lr": 1, "inner": {"proj_dim": 8}, "seeds": [1, 2]})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.inner.proj_dim == 8 and cfg.seeds == [1, 2] and cfg.path is None


@pytest.mark.parametrize(
    "data, message",
    [
        ({"lrr": 1}, "unknown config key(s): lrr"),
        ({"inner": {"proj": 1}}, "unknown config key(s): inner.proj"),
        ({"inner": {"proj_dim": "big"}}, "'inner.proj_dim' must be an integer"),
        ({"inner": {"proj_dim": True}}, "'inner.proj_dim' must be an integer"),
        ({"seeds": [1, "a"]}, "'seeds[1]' must be an integer"),
        ({"path": 3}, "'path'"),
    ],
)
def test_bad_keys_and_types_name_the_key(data, message):
    with pytest.raises(ValueError) as e:
        from_dict(Outer, data)
    assert message in str(e.value)


def test_overrides_and_yaml_round_trip(tmp_path):
    data = apply_overrides({"inner": {"proj_dim": 4}}, ["inner.proj_dim=512", "name=run1", "seeds=[3, 4]"])
    assert data == {"inner": {"proj_dim": 512}, "name": "run1", "seeds": [3, 4]}
    cfg = from_dict(Outer, data)
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(Outer, tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(Outer, tmp_path / "c.yaml", ["inner.nope=1"])


@dataclass
class WithUnions:
    sub: Inner | None = None
    k: int | list[int] = 1


def test_union_errors_are_reported_not_dropped():
    # one arm besides None: its own error (the dotted key and the known keys) is the message
    with pytest.raises(ValueError) as e:
        from_dict(WithUnions, {"sub": {"proj_dimm": 3}})
    assert "unknown config key(s): sub.proj_dimm" in str(e.value) and "sub.proj_dim" in str(e.value)
    # several arms: why each one failed
    with pytest.raises(ValueError) as e:
        from_dict(WithUnions, {"k": [1, "x"]})
    msg = str(e.value)
    assert "matches none of" in msg and "must be an integer, got [1, 'x']" in msg and "'k[1]' must be an integer" in msg
