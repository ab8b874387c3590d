"""uid/gid range validation of the AMS (ranges.py) and its use by AMS.open."""

from __future__ import annotations

import pytest

from xos_sshd.ams import AMS, RangeError, VOPolicy, read_system_ids, validate_policies


def pols(*ps: VOPolicy) -> dict[str, VOPolicy]:
    return {p.vo: p for p in ps}


def write_tables(tmp_path, passwd: str, group: str) -> tuple[str, str]:
    pw = tmp_path / "passwd"
    gr = tmp_path / "group"
    pw.write_text(passwd)
    gr.write_text(group)
    return str(pw), str(gr)


def test_good_ranges_pass():
    validate_policies(pols(
        VOPolicy("atlas", uid_range=(200000, 200999)),
        VOPolicy("cms", uid_range=(201000, 201999), gid_range=(301000, 301999)),
        VOPolicy("lhcb", kind="pool", uid_range=(202000, 202009), pool=("lhcb01", "lhcb02")),
        VOPolicy("alice", kind="static", static={"bob": "bob"}),
    ))


def test_range_covering_uid_0_is_refused_naming_root():
    with pytest.raises(RangeError) as ei:
        validate_policies(pols(VOPolicy("atlas", uid_range=(0, 5000))))
    msg = str(ei.value)
    assert "root" in msg and "/etc/passwd" in msg
    assert "1000..2147483646" in msg


def test_range_covering_65534_is_refused():
    # Real /etc/passwd has nobody (65534); the rule holds even without it.
    with pytest.raises(RangeError) as ei:
        validate_policies(pols(VOPolicy("atlas", uid_range=(60000, 70000))))
    assert "65534" in str(ei.value)


def test_65534_refused_even_when_not_in_passwd(tmp_path):
    pw, gr = write_tables(tmp_path, "root:x:0:0::/root:/bin/sh\n", "root:x:0:\n")
    with pytest.raises(RangeError, match="overflow id 65534"):
        validate_policies(pols(VOPolicy("atlas", uid_range=(60000, 70000))), pw, gr)


def test_range_containing_an_entry_of_etc_passwd_is_refused():
    system = read_system_ids()
    candidates = [e for e in system.users if 1000 <= e.id <= 2**31 - 2 and e.id != 65534]
    if not candidates:
        pytest.skip("no regular user in /etc/passwd")
    entry = candidates[0]
    with pytest.raises(RangeError) as ei:
        validate_policies(pols(VOPolicy("atlas", uid_range=(entry.id, entry.id + 10),
                                        gid_range=(900000, 900010))))
    assert entry.name in str(ei.value) and str(entry.id) in str(ei.value)


def test_range_containing_a_custom_passwd_and_group_entry(tmp_path):
    pw, gr = write_tables(
        tmp_path,
        "root:x:0:0::/root:/bin/sh\nalien:x:250005:100::/home/alien:/bin/sh\n",
        "root:x:0:\nlab:x:350003:\n",
    )
    with pytest.raises(RangeError) as ei:
        validate_policies(pols(VOPolicy("atlas", uid_range=(250000, 250999), gid_range=(350000, 350999))), pw, gr)
    msg = str(ei.value)
    assert "250005 (alien in" in msg
    assert "350003 (lab in" in msg
    # Same ranges, clean tables: fine.
    pw2, gr2 = write_tables(tmp_path, "root:x:0:0::/root:/bin/sh\n", "root:x:0:\n")
    validate_policies(pols(VOPolicy("atlas", uid_range=(250000, 250999), gid_range=(350000, 350999))), pw2, gr2)


def test_primary_gid_of_passwd_entry_counts_as_taken(tmp_path):
    pw, gr = write_tables(tmp_path, "svc:x:400:350007::/:/bin/false\n", "")
    with pytest.raises(RangeError, match="350007"):
        validate_policies(pols(VOPolicy("atlas", uid_range=(250000, 250999), gid_range=(350000, 350999))), pw, gr)


def test_overlapping_vo_ranges_are_refused():
    with pytest.raises(RangeError) as ei:
        validate_policies(pols(
            VOPolicy("atlas", uid_range=(200000, 200999), gid_range=(300000, 300999)),
            VOPolicy("cms", uid_range=(200500, 201500), gid_range=(301000, 301999)),
        ))
    assert "uid ranges of VO 'atlas'" in str(ei.value) and "'cms'" in str(ei.value)
    with pytest.raises(RangeError, match="gid ranges"):
        validate_policies(pols(
            VOPolicy("atlas", uid_range=(200000, 200999), gid_range=(300000, 300999)),
            VOPolicy("cms", uid_range=(201000, 201999), gid_range=(300999, 301999)),
        ))


@pytest.mark.parametrize("rng", [(999, 2000), (2**31 - 10, 2**31 - 1), (5000, 4000)])
def test_bounds(rng):
    with pytest.raises(RangeError):
        validate_policies(pols(VOPolicy("atlas", uid_range=rng, gid_range=(900000, 900100))))


def test_dynamic_needs_a_range():
    with pytest.raises(RangeError, match="needs uid_range"):
        validate_policies(pols(VOPolicy("atlas")))


def test_pool_checks():
    with pytest.raises(RangeError, match="does not fit"):
        validate_policies(pols(VOPolicy("p", kind="pool", uid_range=(200000, 200001), pool=("a1", "a2", "a3"))))
    with pytest.raises(RangeError, match="not a valid account name"):
        validate_policies(pols(VOPolicy("p", kind="pool", uid_range=(200000, 200010), pool=("Bad:Name",))))
    with pytest.raises(RangeError, match="already exists"):
        validate_policies(pols(VOPolicy("p", kind="pool", uid_range=(200000, 200010), pool=("root",))))
    with pytest.raises(RangeError, match="empty pool"):
        validate_policies(pols(VOPolicy("p", kind="pool", uid_range=(200000, 200010))))


async def test_ams_open_refuses_bad_ranges(tmp_path):
    with pytest.raises(RangeError, match="root"):
        await AMS.open(tmp_path / "ams.sqlite", pols(VOPolicy("atlas", uid_range=(0, 100))), tmp_path / "nss")
    assert not (tmp_path / "ams.sqlite").exists()
