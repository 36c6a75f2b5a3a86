"""benchmarks.scaling's bookkeeping: identifier method names in the results cache, and the target table's
verdicts computed from the runs (not from hand-written text)."""
import json

from benchmarks import scaling

MIB = 2**20


def run(method, size="350M", tokens=4096, dtype="bf16", peak_mib=1000, state_mib=10, parameters=350e6):
    return {"method": method, "size": size, "tokens": tokens, "dtype": dtype, "parameters": parameters,
            "peak_bytes": peak_mib * MIB, "state_bytes": state_mib * MIB}


def test_method_names_are_identifiers_and_the_cache_uses_them():
    assert all(m.isidentifier() for m in scaling.METHODS)
    cache = json.loads(scaling.CACHE.read_text())
    assert cache and all(r["method"] in scaling.METHODS and name == scaling.key(r) for name, r in cache.items())


def test_target_rows_judge_fused_against_lora_and_price_exact_mode():
    runs = [run(scaling.LORA), run(scaling.FUSED, peak_mib=900), run(scaling.FUSED_EXACT, peak_mib=1100, state_mib=210),
            run(scaling.LORA, dtype="fp32", peak_mib=2000), run(scaling.FUSED, dtype="fp32", peak_mib=2100),
            run(scaling.LORA, size="30M", parameters=35e6), run(scaling.FUSED, size="30M", parameters=35e6,
                                                                peak_mib=5000)]
    rows = scaling.target_rows(runs)
    assert [r[:3] for r in rows] == [["350M", 4096, "bf16"], ["350M", 4096, "fp32"]]  # below 100M: no target
    assert rows[0][4:] == ["900", "0.90x", "met", "1100 (1.10x)", "+200", "200"]
    assert rows[1][4:7] == ["2100", "1.05x", "missed"] and rows[1][7:] == ["-", "-", "-"]


def test_not_run_lists_the_methods_missing_at_each_measured_point():
    lines = scaling.not_run([run(m) for m in scaling.METHODS if m != scaling.GALORE])
    assert lines == [f"- 350M, 4096 tokens, bf16: `{scaling.GALORE}`"]
