"""Configuration: gin bindings reach the dataclasses; bad input is a clear error."""

import pytest

from hmem_jax.config import ConfigError, TrainConfig
from hmem_jax.main.common import load_train_config


def test_gin_bindings_reach_nested_dataclasses():
    cfg = load_train_config(
        (),
        (
            "TrainConfig.steps = 7",
            "ModelConfig.d_model = 96",
            "MeshConfig.tensor = 2",
            "OptimConfig.peak_lr = 1e-3",
        ),
    )
    assert cfg.steps == 7 and cfg.model.d_model == 96 and cfg.mesh.tensor == 2
    assert cfg.optim.peak_lr == 1e-3


def test_the_default_experiment_file_loads_by_name():
    cfg = load_train_config(("default",), ())
    assert isinstance(cfg, TrainConfig) and cfg.data.source == "embedded"


def test_a_paper_preset_is_selected_through_gin():
    cfg = load_train_config(
        (),
        (
            "TrainConfig.model = @model_preset()",
            "model_preset.name = '410m'",
            "DataConfig.vocab_size = 2048",
        ),
    )
    assert (cfg.model.num_layers, cfg.model.d_model, cfg.model.tie_embeddings) == (24, 1024, False)


@pytest.mark.parametrize(
    "files, params, fragment",
    [
        (("no_such_experiment",), (), "no such file"),
        ((), ("ModelConfig.no_such_field = 1",), "no_such_field"),
        ((), ("NoSuchConfig.steps = 1",), "NoSuchConfig"),
        ((), ("TrainConfig.steps = 0",), "TrainConfig.steps must be > 0"),
        ((), ("TrainConfig.batch_size = 10", "TrainConfig.grad_accum_steps = 4"), "divisible"),
        ((), ("model_preset.name = 'huge'", "TrainConfig.model = @model_preset()"), "huge"),
        ((), ("OptimConfig.schedule = 'linear'",), "schedule"),
        ((), ("TrainConfig.steps = ",), "Invalid gin"),
        ((), ("TrainConfig.steps = 2.5",), r"TrainConfig.steps = 2.5 must be an int\."),
        ((), ("TrainConfig.steps = 'abc'",), "TrainConfig.steps = 'abc' must be an int"),
        ((), ("OptimConfig.peak_lr = '3e-3'",), "OptimConfig.peak_lr = '3e-3' must be a number"),
        ((), ("MemoryConfig.level_sizes = (8, 4.5)",), "must be a tuple of ints"),
        ((), ("ModelConfig.tie_embeddings = 1",), "must be True or False"),
        ((), ("ModelConfig.num_kv_heads = 'two'",), "must be an int or None"),
    ],
)
def test_bad_configuration_is_a_clear_error(files, params, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_train_config(files, params)


@pytest.mark.parametrize(
    "name, anchor, bank, fetched",
    [
        ("paper_160m", 163_510_016, 4.62e9, 18.06e6),
        ("paper_410m", 411_665_408, 12.68e9, 49.5e6),
        ("paper_1p4b", 1_439_893_504, 21.14e9, 153.4e6),
    ],
)
def test_info_reports_the_papers_anchor_bank_and_fetched_sizes(name, anchor, bank, fetched):
    from hmem_jax.main.info import describe

    info = describe(load_train_config((name,), ("TrainConfig.init_from = 'runs/anchor'",)))
    assert info["anchor_params"] == anchor
    assert info["bank_params"] == pytest.approx(bank, rel=5e-3)
    assert info["fetched_params"] == pytest.approx(fetched, rel=5e-3)


def test_cotraining_without_an_anchor_to_start_from_is_a_clear_error():
    data = ("DataConfig.path = '/data/corpus'", "DataConfig.tokenizer_path = '/models/neox'")
    cfg = load_train_config(("paper_160m",), data)  # describable (`hmem info`), not startable
    with pytest.raises(ConfigError, match="init_from"):
        cfg.check_startable()
    with pytest.raises(ConfigError, match="scratch"):
        load_train_config(
            (),
            (
                "MemoryConfig.kind = 'ffn'",
                "HierarchyConfig.depth = 1",
                "MemoryConfig.level_sizes = (4,)",
                "TrainConfig.init_from = 'runs/anchor'",
            ),
        )


@pytest.mark.parametrize("name", ["paper_160m", "paper_410m", "paper_1p4b"])
def test_the_paper_runs_need_their_corpus_and_tokenizer_before_anything_reads_data(name, tmp_path):
    """The paper gins describe themselves without a corpus or tokenizer (`hmem info`), but
    training, preparing and clustering stop with one line naming the missing setting."""
    from hmem_jax.data.prepare import ensure_prepared
    from hmem_jax.data.sources import read_documents

    anchor = ("TrainConfig.init_from = 'runs/anchor'",)
    for given, missing in (
        ((), "DataConfig.path must be set"),
        (("DataConfig.path = '/data/corpus'",), "DataConfig.tokenizer_path must be set"),
    ):
        cfg = load_train_config((name,), anchor + given)
        with pytest.raises(ConfigError, match=missing):
            cfg.check_startable()
        with pytest.raises(ConfigError, match=missing):
            ensure_prepared(cfg, str(tmp_path / "data"), progress=False)
    with pytest.raises(ConfigError, match="DataConfig.path must be set"):
        next(read_documents(load_train_config((name,), anchor).data))
    both = ("DataConfig.path = '/data/corpus'", "DataConfig.tokenizer_path = '/models/neox'")
    load_train_config((name,), anchor + both).check_startable()
    assert not (tmp_path / "data").exists()


def test_memory_levels_must_match_the_tree_depth():
    from hmem_jax.main.info import describe

    cfg = load_train_config(
        (),
        (
            "MemoryConfig.kind = 'ffn'",
            "MemoryConfig.level_sizes = (4, 2)",
            "HierarchyConfig.depth = 3",
        ),
    )
    with pytest.raises(ConfigError, match="HierarchyConfig.depth = 3"):
        describe(cfg)
