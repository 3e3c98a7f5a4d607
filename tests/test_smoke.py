from conftest import Org
from helpers import create_instance


def test_create_then_list(org: Org) -> None:
    with org.client() as client:
        created = create_instance(client, "web-1")
        listed = client.get("/v1/instances").json()
    assert [item["id"] for item in listed["instances"]] == [created["id"]]
    assert listed["meta"]["total"] == 1
