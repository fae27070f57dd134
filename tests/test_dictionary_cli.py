"""The fleet's current dictionary: publishing one makes it current and keeps the ones before
(bundles name them), a bad pointer is refused in one line, and ``tenantsync dictionary``
trains one on this host's tenants, lists what is stored, and refuses an encrypted fleet.

Real databases of one schema, on file:// and S3 (moto); the command line as a subprocess.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from tenantsync import dictionary
from tenantsync.catalogue import open_catalogue
from tenantsync.config import Config
from tenantsync.dictionary import CURRENT_KEY, Dictionaries, Published, publish
from tenantsync.errors import BundleError, DictionaryMissing
from tenantsync.keyring import ENV_VAR
from tenantsync.storage import open_storage

from .test_bundle import saas_db
from .test_server import ROOT


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six tenants of one schema, small enough to train on in a blink."""
    base = tmp_path_factory.mktemp("corpus")
    return [saas_db(base / f"t{i}.db", i, rows=100) for i in range(6)]


# -- the pointer -----------------------------------------------------------------------------


def test_publishing_makes_a_dictionary_current_and_keeps_the_one_before(storage, corpus):
    dictionaries = Dictionaries(storage)
    assert dictionaries.current() is None and dictionaries.published() is None and dictionaries.stored() == {}

    first = dictionary.train(corpus[:3], size=16 << 10)
    assert publish(storage, first, databases=3) == first.dict_id()
    assert dictionaries.current().as_bytes() == first.as_bytes()
    published = dictionaries.published()
    assert (published.id, published.databases, published.size) == (first.dict_id(), 3, len(first.as_bytes()))
    assert json.loads(storage.read(CURRENT_KEY)).keys() == {"id", "trained_at", "databases", "bytes"}

    second = dictionary.train(corpus[3:], size=16 << 10, seed=1)
    assert publish(storage, second, databases=3) == second.dict_id() != first.dict_id()
    assert dictionaries.current().as_bytes() == second.as_bytes()
    assert dictionaries.load(first.dict_id()).as_bytes() == first.as_bytes()  # bundles may still name it
    assert set(dictionaries.stored()) == {first.dict_id(), second.dict_id()}


def test_a_bad_pointer_is_refused_in_one_line_and_the_next_publish_replaces_it(storage, corpus):
    dictionaries = Dictionaries(storage)
    url = re.escape(storage.object_url(CURRENT_KEY))
    storage.write_if_absent(CURRENT_KEY, b"{not json")
    with pytest.raises(BundleError, match=f"^{url}: not a current-dictionary pointer .*: publish a dictionary again"):
        dictionaries.current()

    storage.delete([CURRENT_KEY])
    storage.write_if_absent(CURRENT_KEY, Published(40000, datetime.now(timezone.utc), 1, 100).encode())
    gone = f"^{url} names a dictionary that is gone: .*zstd dictionary 40000 is missing"
    with pytest.raises(DictionaryMissing, match=gone):
        dictionaries.current()

    trained = dictionary.train(corpus, size=16 << 10)
    publish(storage, trained, databases=len(corpus))
    assert dictionaries.current().dict_id() == trained.dict_id()


# -- the command line ------------------------------------------------------------------------


def fleet_config(tmp_path, storage_url, *, encrypt: bool = False) -> str:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "tenantsync.yml"
    path.write_text(json.dumps({"replica": storage_url, "globs": [f"{tmp_path}/data/*.db"], "host": "h1",
                                "catalogue": f"sqlite:///{tmp_path}/cat.db", "encrypt": encrypt}))
    return str(path)


def tenantsync(config: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tenantsync", *args, "--config", config], capture_output=True,
                          text=True, env=dict(env or os.environ, PYTHONPATH=ROOT), timeout=120)


def test_train_publishes_a_dictionary_of_this_hosts_tenants_and_list_marks_it_current(tmp_path, storage_url):
    config = fleet_config(tmp_path, storage_url)
    cfg = Config(replica=storage_url, catalogue=f"sqlite:///{tmp_path}/cat.db", host="h1")
    catalogue = open_catalogue(cfg)
    for i in range(4):
        catalogue.discover(f"t{i}.db", saas_db(tmp_path / "data" / f"t{i}.db", i, rows=100), "h1")
    catalogue.discover("gone.db", str(tmp_path / "data" / "gone.db"), "h1")  # archived: no file here
    catalogue.discover("away.db", saas_db(tmp_path / "away.db", 9, rows=100), "h2")  # another host's

    proc = tenantsync(config, "dictionary", "train", "--sample", "3")
    assert proc.returncode == 0, proc.stderr
    current = Dictionaries(open_storage(storage_url)).published()
    assert proc.stdout == f"dictionary {current.id}: {current.size} bytes trained on 3 databases, now current\n"

    proc = tenantsync(config, "dictionary", "train")
    assert proc.returncode == 0 and "trained on 4 databases" in proc.stdout, proc.stderr
    latest = Dictionaries(open_storage(storage_url)).published()
    proc = tenantsync(config, "dictionary", "list")
    assert proc.returncode == 0, proc.stderr
    rows = {row.split()[0]: row for row in proc.stdout.splitlines()[1:]}
    assert rows.keys() == {str(current.id), str(latest.id)}
    assert rows[str(latest.id)].endswith("yes, trained on 4 databases") and not rows[str(current.id)].endswith("s")

    missing = open_storage(storage_url).object_url(dictionary.dictionary_key(latest.id))
    open_storage(storage_url).delete([dictionary.dictionary_key(latest.id)])
    proc = tenantsync(config, "dictionary", "list")
    assert proc.returncode == 1 and len(proc.stdout.splitlines()) == 2
    assert proc.stderr == f"tenantsync: error: {missing}: the current dictionary is missing; publish another " \
                          f"(tenantsync dictionary train)\n"


def test_train_refuses_an_encrypted_fleet_and_stores_nothing(tmp_path, storage_url, corpus):
    key = base64.b64encode(b"\x01" * 32).decode()
    env = dict(os.environ, **{ENV_VAR: json.dumps({"keys": {"k1": key}, "current": "k1"})})
    proc = tenantsync(fleet_config(tmp_path, storage_url, encrypt=True), "dictionary", "train", *corpus, env=env)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "is encrypted: a fleet dictionary would hold fragments" in proc.stderr
    assert "shred could not erase a tenant from it" in proc.stderr
    assert not list(open_storage(storage_url).list(""))


def test_train_without_databases_or_on_a_file_that_is_not_one_fails_in_one_line(tmp_path, storage_url):
    config = fleet_config(tmp_path, storage_url)
    proc = tenantsync(config, "dictionary", "train")
    assert proc.returncode == 1, proc.stderr
    fleet = Config(replica=storage_url).fleet
    assert proc.stderr == (f"tenantsync: error: no database to train a dictionary on: fleet {fleet} has no tenant "
                           f"database on host h1; name database files to train on\n")
    junk = tmp_path / "notes.txt"
    junk.write_text("not a database\n" * 20)
    proc = tenantsync(config, "dictionary", "train", str(junk))
    assert proc.returncode == 1
    assert proc.stderr == f"tenantsync: error: {junk}: not a SQLite database, cannot sample its pages\n"
    assert not list(open_storage(storage_url).list(""))
