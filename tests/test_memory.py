"""Giving freed memory back: malloc_trim after work on many pixels, and only then."""

from segserve.service.runtime import memory


def test_memory_is_given_back_only_after_work_on_many_pixels(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "malloc_trim", lambda pad: calls.append(pad) or 1)
    memory.give_back_memory(memory.TRIM_AFTER_PIXELS - 1)
    assert calls == []
    memory.give_back_memory(memory.TRIM_AFTER_PIXELS)
    assert calls == [0]


def test_without_malloc_trim_nothing_is_called(monkeypatch):
    monkeypatch.setattr(memory, "malloc_trim", None)
    memory.give_back_memory(10**9)  # no C library function: a no-op, not an error


def test_glibc_s_malloc_trim_is_found_here():
    assert memory.load_trim() is not None  # the machines this project runs on use glibc
