from loraplex.tools import gen_protos


def test_committed_stubs_match_the_proto_files():
    assert gen_protos.main(["--check"]) == 0
