from pase.graph.viewmap import broadcast_axis_map, compose, reshape_axis_map, view_axis_map


def test_reshape_merges_and_splits() -> None:
    assert reshape_axis_map((2, 64, 16, 16), (2, 64, 256)) == [(0,), (1,), (2, 3)]
    assert reshape_axis_map((2, 256, 64), (2, 256, 8, 8)) == [(0,), (1,), (2,), (2,)]
    assert reshape_axis_map((2, 1, 5), (2, 5)) == [(0,), (2,)]


def test_permute_and_transpose() -> None:
    assert view_axis_map("transpose", (2, 3, 4), (2, 4, 3), {"swap": (1, 2)}) == [(0,), (2,), (1,)]
    assert view_axis_map("permute", (2, 3, 4), (4, 2, 3), {"perm": [2, 0, 1]}) == [(2,), (0,), (1,)]


def test_broadcast_and_compose() -> None:
    assert broadcast_axis_map((4, 1, 1), (2, 4, 8, 8)) == [(), (0,), (), ()]
    first = reshape_axis_map((2, 256, 64), (2, 256, 8, 8))
    second = view_axis_map("transpose", (2, 256, 8, 8), (2, 8, 256, 8), {"swap": (1, 2)})
    assert compose(first, second) == [(0,), (2,), (1,), (2,)]
