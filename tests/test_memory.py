"""Giving freed memory back: malloc_trim after work on many pixels, and only then."""

from segserve.service.runtime import memory


def test_memory_is_given_back_only_after_work_on_many_pixels(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "malloc_trim", lambda pad: calls.append(pad) or 1)
    assert memory.give_back_memory(memory.TRIM_AFTER_PIXELS - 1) is False
    assert calls == []
    assert memory.give_back_memory(memory.TRIM_AFTER_PIXELS) is True
    assert calls == [0]


def test_without_malloc_trim_giving_back_is_a_no_op_not_an_error(monkeypatch):
    monkeypatch.setattr(memory, "malloc_trim", None)
    assert memory.give_back_memory(10**9) is False  # no C library function to call


def test_glibc_s_malloc_trim_is_found_here():
    assert memory.load_trim() is not None  # the machines this project runs on use glibc
