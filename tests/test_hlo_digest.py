"""benchmarks.hlo_digest: the `ops` digest ignores SSA names and emission order only."""
from benchmarks.hlo_digest import digests

A = """func.func @main(%arg0: tensor<2xf32>) -> tensor<2xf32> {
  %0 = stablehlo.add %arg0, %arg0 : tensor<2xf32> loc(#loc1)
  %1 = stablehlo.multiply %arg0, %arg0 : tensor<2xf32>
  return %1 : tensor<2xf32>
}"""
REORDERED = """func.func @main(%arg0: tensor<2xf32>) -> tensor<2xf32> {
  %7 = stablehlo.multiply %arg0, %arg0 : tensor<2xf32>
  %3 = stablehlo.add %arg0, %arg0 : tensor<2xf32> loc(#loc9)
  return %7 : tensor<2xf32>
}"""


def test_ops_digest_ignores_order_and_names_but_not_ops():
  a, b = digests(A), digests(REORDERED)
  assert a["ops"] == b["ops"] and a["exact"] != b["exact"] and a["lines"] == b["lines"]
  changed = digests(REORDERED.replace("multiply", "subtract"))
  assert changed["ops"] != a["ops"]
