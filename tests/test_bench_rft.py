"""bench/rft.py: the table it prints from its rows (ratios to dense, the held-out curve)."""

from conftest import load_bench_script


def test_summary_table_gives_ratios_to_dense_and_the_heldout_curve():
    rft = load_bench_script("rft")
    rows = [
        {"variant": "dense", "spec": {}, "params": 100e6, "ppl_wikitext2_test": 20.0, "ppl_lambada": 40.0,
         "heldout_loss": 3.0},
        {"variant": "default-25+rft", "spec": {"rft": {"lr": 5e-4, "steps": 200}}, "params": 80e6,
         "ppl_wikitext2_test": 30.0, "ppl_lambada": 100.0,
         "rft": {"loss_first": 3.9, "loss_last": 2.9, "heldout_losses": [{"step": 0, "loss": 4.1},
                                                                       {"step": 200, "loss": 3.3}]}},
    ]
    lines = rft.summary_table(rows).splitlines()
    assert "3.000" in lines[1] and "1.000" in lines[1]
    tuned = lines[2]
    assert "3.900->2.900" in tuned and "4.100->3.300" in tuned
    assert "1.500" in tuned and "2.500" in tuned  # 30/20 and 100/40
