"""The reduce computed another way: DuckDB SQL over the same committed files."""

import duckdb
import pyarrow as pa


def edge_oracle(edges: pa.Table, min_count: int = 1) -> pa.Table:
    con = duckdb.connect()
    con.register("e", edges)
    result = con.sql(f"""
        SELECT src_layer, src_neuron, tgt_layer, tgt_neuron,
               count(*) AS count, count(DISTINCT graph_id) AS graph_count,
               sum(weight::DOUBLE) AS weight_sum, sum(abs(weight::DOUBLE)) AS weight_abs_sum,
               sum(weight::DOUBLE * weight::DOUBLE) AS weight_sq_sum,
               min(weight) AS weight_min, max(weight) AS weight_max
        FROM e WHERE src_neuron <> -1
        GROUP BY ALL HAVING count(*) >= {min_count} ORDER BY ALL""").arrow()
    return result.read_all() if hasattr(result, "read_all") else result


def neuron_oracle(nodes: pa.Table) -> pa.Table:
    con = duckdb.connect()
    con.register("n", nodes)
    result = con.sql("""
        SELECT layer, neuron, count(DISTINCT graph_id) AS graph_count, count(*) AS position_count,
               avg(activation::DOUBLE) AS activation_mean, max(activation) AS activation_max,
               avg(score::DOUBLE) AS score_mean, avg(abs(score::DOUBLE)) AS score_abs_mean
        FROM n WHERE neuron <> -1 GROUP BY ALL ORDER BY ALL""").arrow()
    return result.read_all() if hasattr(result, "read_all") else result


def assert_same(ours: pa.Table, oracle: pa.Table) -> None:
    import numpy as np

    assert ours.num_rows == oracle.num_rows
    for name in oracle.column_names:
        a, b = ours.column(name).to_numpy(), oracle.column(name).to_numpy()
        if np.issubdtype(b.dtype, np.floating) and b.dtype == np.float64:
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, err_msg=name)
        else:
            assert np.array_equal(a, b.astype(a.dtype)), name
