"""SQLite writers queue on the write gate (anim/index/engine.py), not in SQLite's busy loop.

Two engines on one database file stand for two processes (each has its own thread lock;
they meet on the flock of ``<database>.writelock``). A second writer waits while the first
holds its transaction and gets in once it commits or rolls back, whatever way it ends.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from anim.index.engine import make_engine


def _writer(engine):  # type: ignore[no-untyped-def]
    return engine.connect().execution_options(anim_writer=True)


@pytest.fixture
def engines(tmp_path: Path):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    a, b = make_engine(url), make_engine(url)
    with _writer(a) as conn, conn.begin():
        conn.execute(text("CREATE TABLE t (n INTEGER)"))
    yield a, b
    a.dispose()
    b.dispose()


@pytest.mark.parametrize("ending", ["commit", "rollback", "exception"])
def test_a_second_writer_gets_in_when_the_first_ends(engines, ending: str) -> None:  # type: ignore[no-untyped-def]
    a, b = engines
    order: list[str] = []
    inside = threading.Event()
    go = threading.Event()

    def first() -> None:
        conn = _writer(a)
        try:
            trans = conn.begin()
            conn.execute(text("INSERT INTO t VALUES (1)"))
            inside.set()
            go.wait(10)
            order.append("first ends")
            if ending == "commit":
                trans.commit()
            elif ending == "rollback":
                trans.rollback()
            else:
                with trans:
                    raise RuntimeError("a write that fails")
        except RuntimeError:
            pass
        finally:
            conn.close()

    def second() -> None:
        with _writer(b) as conn, conn.begin():
            order.append("second in")
            conn.execute(text("INSERT INTO t VALUES (2)"))

    t1 = threading.Thread(target=first)
    t1.start()
    assert inside.wait(10)
    t2 = threading.Thread(target=second)
    t2.start()
    t2.join(0.5)
    assert t2.is_alive(), "the second writer must wait for the first"
    assert order == []
    go.set()
    t1.join(10)
    t2.join(10)
    assert not t2.is_alive()
    assert order == ["first ends", "second in"]
    with b.connect() as conn:
        rows = sorted(r[0] for r in conn.execute(text("SELECT n FROM t")))
    assert rows == ([1, 2] if ending == "commit" else [2])


def test_readers_do_not_wait_for_a_writer(engines) -> None:  # type: ignore[no-untyped-def]
    a, b = engines
    with _writer(a) as w, w.begin():
        w.execute(text("INSERT INTO t VALUES (1)"))
        with b.connect() as r:  # WAL: a reader sees the last commit, at once
            assert r.execute(text("SELECT count(*) FROM t")).scalar() == 0
    with b.connect() as r:
        assert r.execute(text("SELECT count(*) FROM t")).scalar() == 1


def test_one_engine_many_threads_each_write_lands(engines) -> None:  # type: ignore[no-untyped-def]
    a, _ = engines

    def write(n: int) -> None:
        for i in range(20):
            with _writer(a) as conn, conn.begin():
                conn.execute(text("INSERT INTO t VALUES (:n)"), {"n": n * 100 + i})

    threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with a.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 120
