"""Recipes: one per model, for every mode. The mode is the data, so the filled-in configs of two modes
differ only in where the data is and where the model goes."""

import pytest
import yaml

from conftest import ROOT
from curate.experiment import DATA_KEYS, config_differences
from curate.recipes import RecipeError, prepare_recipe, render_recipe

pytestmark = pytest.mark.fast

RECIPES = ROOT / "recipes" / "axolotl"
MODELS = ["gemma-2-2b-it", "llama-3-8b-instruct", "mistral-7b-instruct-v0.3", "smollm2-135m-instruct"]


def test_recipe_variables_are_filled_and_a_missing_one_is_named():
    assert render_recipe("a: ${DATA}\nb: ${STEPS:-3}\n", {"DATA": "/x.parquet"}) == "a: /x.parquet\nb: 3\n"
    with pytest.raises(RecipeError, match="needs DATA"):
        render_recipe("a: ${DATA}", {})


def test_each_model_has_one_recipe():
    assert sorted(path.relative_to(RECIPES).as_posix() for path in RECIPES.rglob("*.yml")) == [
        f"{m}.yml" for m in MODELS
    ]


@pytest.mark.parametrize("model", MODELS)
def test_the_configs_of_two_modes_differ_only_in_data_and_output_paths(model, tmp_path):
    configs = {}
    for mode in ("stm", "ground-truth"):
        data = tmp_path / f"train-{mode}.parquet"
        data.touch()
        written = prepare_recipe(RECIPES / f"{model}.yml", data, {}, tmp_path / f"{model}-{data.stem}.yml", check=False)
        configs[mode] = yaml.safe_load(written.read_text())
    assert set(config_differences(configs["stm"], configs["ground-truth"])) == set(DATA_KEYS)
    stm = configs["stm"]
    assert stm["datasets"][0]["path"] == str(tmp_path / "train-stm.parquet")
    assert stm["output_dir"] == str(tmp_path / f"{model}-train-stm")  # beside its config, under its name
