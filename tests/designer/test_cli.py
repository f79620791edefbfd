import pytest

from designer.cli import build_parser, main


def test_tree_prints_the_collapsed_tree(capsys):
    assert main(["tree", "catalog:gpt2", "--width", "120"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("root (GPT2LMHeadModel) 124.4M\n")
    assert "│   │   └── 0-11 ×12 (GPT2Block) 7.1M each\n" in out


def test_match_prints_each_expression_with_counts(capsys):
    code = main(["match", "catalog:bert-base-uncased", "query", "pooler.dense",
                 "--exclude", r"[r]layer\.(0|1)\.attention\.self\.query"])
    assert code == 0
    out = capsys.readouterr().out
    assert "query: 12 modules\n  encoder.layer.0.attention.self.query\n" in out
    assert "pooler.dense: 1 module\n  pooler.dense\n" in out
    assert "exclude [r]layer\\.(0|1)\\.attention\\.self\\.query: removed 2\n" in out
    assert out.rstrip().endswith("selected: 11 modules")


def test_match_exits_non_zero_on_an_expression_matching_nothing(capsys):
    assert main(["match", "catalog:bert-base-uncased", "query", "vaule"]) == 1
    err = capsys.readouterr().err
    assert "'vaule' matches no module" in err and "value" in err


def test_bad_source_is_an_error_not_a_traceback(capsys):
    assert main(["tree", "catalog:gtp2"]) == 1
    assert "did you mean gpt2" in capsys.readouterr().err


def test_no_subcommand_means_serve_with_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.backbone) == ("127.0.0.1", 5000, "minilm")


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as caught:
        main(["match", "catalog:gpt2"])
    assert caught.value.code == 2
