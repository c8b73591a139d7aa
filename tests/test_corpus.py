from alphaq.evaluate import corpus


def test_splits_are_disjoint_and_cover_both_domains():
    for domain in corpus.DOMAINS:
        seen = {}
        for split in corpus.SPLITS:
            files = corpus.list_files(domain, split)
            assert files, (domain, split)
            for f in files:
                assert f.relpath not in seen, f"{f.relpath} in {seen.get(f.relpath)} and {split}"
                seen[f.relpath] = split
                assert corpus.split_of(f.relpath) == split


def test_heldout_fixture_text_comes_from_the_test_split():
    from conftest import FIXTURES

    for domain in corpus.DOMAINS:
        committed = (FIXTURES / "heldout" / f"{domain}.txt").read_text()
        first_test_file = corpus.list_files(domain, "test")[0].path.read_text(errors="replace")
        assert committed[: len(first_test_file)] == first_test_file
