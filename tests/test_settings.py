"""One settings loader: every settings file and the server config refuse the same mistakes the
same way (a boolean is no number, a whole-number field takes no fraction), in one line."""

from __future__ import annotations

import pytest

from histosam.backend.cli import main
from histosam.backend.core.errors import InvalidInputError
from histosam.backend.postprocess.edge_snap import EdgeSnapSettings
from histosam.backend.postprocess.propagation import PropagationSettings
from histosam.backend.serving.server import ServerSettings
from histosam.training.config import config_from_dict

CASES = [
    (PropagationSettings.from_mapping, {"gamma": True}, "propagation setting gamma must be a number, got True"),
    (PropagationSettings.from_mapping, {"working_side": 160.9}, "working_side must be a whole number, got 160.9"),
    (EdgeSnapSettings.from_mapping, {"beta": False}, "edge-snap setting beta must be a number"),
    (EdgeSnapSettings.from_mapping, {"working_side": 384.5}, "working_side must be a whole number"),
    (ServerSettings.from_mapping, {"threads": 2.7}, "server setting threads must be a whole number, got 2.7"),
    (ServerSettings.from_mapping, {"port": True}, "server setting port must be a number, got True"),
    (ServerSettings.from_mapping, {"prefer_gpu": "no"}, "prefer_gpu must be true or false"),
    (ServerSettings.from_mapping, {"models": 5}, "models_dir must be a path"),
    (ServerSettings.from_mapping, {"session_idle_seconds": float("inf")}, "must be a finite number"),
    (config_from_dict, {"gamma": True}, "config key gamma must be a number"),
    (config_from_dict, {"num_threads": 2.7}, "config key num_threads must be a whole number"),
    (config_from_dict, {"epochs": True}, "config key epochs must be a number"),
]


@pytest.mark.parametrize("load, raw, message", CASES, ids=[f"{c[0].__qualname__}-{next(iter(c[1]))}" for c in CASES])
def test_the_same_mistake_is_refused_by_every_loader(load, raw, message):
    with pytest.raises(InvalidInputError) as info:
        load(raw)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_values_that_mean_one_thing_are_taken_everywhere():
    assert PropagationSettings.from_mapping({"gamma": "1e-3", "working_side": 160.0}).working_side == 160
    assert ServerSettings.from_mapping({"port": "0", "threads": 3.0}).threads == 3
    assert config_from_dict({"lr": "1e-4", "epochs": 3.0}).epochs == 3
    for load, kind in ((PropagationSettings.from_mapping, "propagation setting"),
                       (ServerSettings.from_mapping, "server setting"), (config_from_dict, "config key")):
        with pytest.raises(InvalidInputError, match=f"unknown {kind}"):
            load({"no_such_key": 1})


@pytest.mark.parametrize("text, message", [
    ("port: [\n", "is not valid YAML at line 2"),
    ("threads: 2.7\n", "server setting threads must be a whole number, got 2.7"),
    ("port: true\n", "server setting port must be a number, got True"),
    ("cpu: 1\n", "cpu must be true or false"),
    ("- port\n", "must be a mapping"),
])
def test_serve_config_mistakes_are_one_line(tmp_path, capsys, text, message):
    config = tmp_path / "serve.yaml"
    config.write_text(text)
    assert main(["serve", "--config", str(config)]) == InvalidInputError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("histosam serve: error:"), err
