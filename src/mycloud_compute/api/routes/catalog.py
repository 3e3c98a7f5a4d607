"""/v1/flavors and /v1/images: readable by every token, managed with the admin scope."""

from __future__ import annotations

from litestar import Request, delete, get, post
from litestar.datastructures import State
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from mycloud_compute.api import views
from mycloud_compute.api.bodies import strict_body
from mycloud_compute.api.links import page_envelope
from mycloud_compute.api.openapi import ITEM_ERRORS, READ_ERRORS, WRITE_ERRORS, list_operation
from mycloud_compute.api.routes.common import path_id
from mycloud_compute.api.schemas import (
    Flavor,
    FlavorCreate,
    FlavorList,
    Image,
    ImageCreate,
    ImageList,
    PageLinks,
    PageMeta,
)
from mycloud_compute.persistence.database import Database
from mycloud_compute.services import catalog as service
from mycloud_compute.services.identity import Principal
from mycloud_compute.services.listing import parse_list_query
from mycloud_compute.settings import Settings

AuthRequest = Request[Principal, None, State]


async def _page(
    request: AuthRequest, db: Database, settings: Settings, kind: str
) -> tuple[service.CatalogPage, PageMeta, PageLinks]:
    query = parse_list_query(request.scope["query_string"], ())
    page = await service.list_items(db, kind, query, include_private=request.user.allows("admin"))
    meta, links = page_envelope(request, settings, query, (), page)
    return page, meta, links


@get(
    "/v1/flavors",
    opt={"scope": "read"},
    summary="List flavors",
    description="List flavors, ordered by name.",
    operation_class=list_operation(()),
    responses=READ_ERRORS,
    tags=["flavors"],
)
async def list_flavors(request: AuthRequest, db: Database, settings: Settings) -> FlavorList:
    page, meta, links = await _page(request, db, settings, "flavor")
    return FlavorList(flavors=[views.flavor(row) for row in page.rows], meta=meta, links=links)


@get("/v1/flavors/{flavor_id:str}", opt={"scope": "read"}, summary="Show a flavor",
     responses=ITEM_ERRORS, tags=["flavors"])
async def show_flavor(request: AuthRequest, flavor_id: str, db: Database) -> Flavor:
    row = await service.get_item(
        db, "flavor", path_id("flavor", flavor_id), include_private=request.user.allows("admin")
    )
    return views.flavor(row)


@post("/v1/flavors", opt={"scope": "admin"}, status_code=HTTP_201_CREATED,
      summary="Create a flavor", responses=WRITE_ERRORS, tags=["flavors"])
async def create_flavor(request: AuthRequest, data: FlavorCreate, db: Database) -> Flavor:
    data = await strict_body(request, FlavorCreate)
    values = {"name": data.name, "vcpus": data.vcpus, "ram": data.ram, "disk": data.disk,
              "is_public": data.is_public}
    return views.flavor(await service.create_item(db, "flavor", values))


@delete("/v1/flavors/{flavor_id:str}", opt={"scope": "admin"}, status_code=HTTP_204_NO_CONTENT,
        summary="Delete a flavor",
        description="Existing instances keep the flavor values they were created with.",
        responses=ITEM_ERRORS, tags=["flavors"])
async def delete_flavor(flavor_id: str, db: Database) -> None:
    await service.delete_item(db, "flavor", path_id("flavor", flavor_id))


@get(
    "/v1/images",
    opt={"scope": "read"},
    summary="List images",
    description="List images, ordered by name.",
    operation_class=list_operation(()),
    responses=READ_ERRORS,
    tags=["images"],
)
async def list_images(request: AuthRequest, db: Database, settings: Settings) -> ImageList:
    page, meta, links = await _page(request, db, settings, "image")
    return ImageList(images=[views.image(row) for row in page.rows], meta=meta, links=links)


@get("/v1/images/{image_id:str}", opt={"scope": "read"}, summary="Show an image",
     responses=ITEM_ERRORS, tags=["images"])
async def show_image(image_id: str, db: Database) -> Image:
    row = await service.get_item(db, "image", path_id("image", image_id), include_private=True)
    return views.image(row)


@post("/v1/images", opt={"scope": "admin"}, status_code=HTTP_201_CREATED,
      summary="Create an image", responses=WRITE_ERRORS, tags=["images"])
async def create_image(request: AuthRequest, data: ImageCreate, db: Database) -> Image:
    data = await strict_body(request, ImageCreate)
    values = {"name": data.name, "os_distro": data.os_distro, "os_version": data.os_version,
              "min_disk": data.min_disk, "min_ram": data.min_ram}
    return views.image(await service.create_item(db, "image", values))


@delete("/v1/images/{image_id:str}", opt={"scope": "admin"}, status_code=HTTP_204_NO_CONTENT,
        summary="Delete an image", responses=ITEM_ERRORS, tags=["images"])
async def delete_image(image_id: str, db: Database) -> None:
    await service.delete_item(db, "image", path_id("image", image_id))


ROUTES = [list_flavors, show_flavor, create_flavor, delete_flavor,
          list_images, show_image, create_image, delete_image]
