"""/audits/{id}/preview and /audits/{id}/edits: what removing pairs would do, and the model without them."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from ecif_core.edit.replay import recipe_of
from ecif_core.edit.settings import METHODS, EditSettings
from ecif_core.edit.from_audit import preview, removal_set, zero_shot_examples
from ecif_core.errors import ConfigError
from ecif_core.data.manifest import Manifest, read_sidecar
from ecif_core.models.check import check_theta
from ecif_core.data.storage import files_under, location, remove_tree, write_text
from ecif_core.values import check_json_values

from ... import repository
from ...manifests import check_confined
from ..deps import OwnerDep, SessionDep, SettingsDep
from ..openapi import REMOVAL_SPEC, edit_links
from ..schemas import EditCreated, EditRequest, EditStatus, errors
from .audits import _owned, _owned_child, _redacted, dispatch_or_fail

router = APIRouter(prefix="/audits/{audit_id}", tags=["edits"], responses=errors(401, 404, 503))
MAX_IDS, MAX_THETA_PATTERNS, MAX_ZERO_SHOT = 1_000_000, 64, 10_000
REQUEST_IDS, KEEP_IDS = "request_ids.txt", "keep_ids.txt"  # the request's lists, not part of the edit's download


def _finished(session, owner: str, audit_id: str):
    audit = _owned(session, owner, audit_id)
    if audit.status != "succeeded":
        raise HTTPException(409, f"audit is {audit.status}; previews and edits need a finished audit")
    return audit


def _server_spec(spec: str | None, field: str = "remove") -> str:
    if spec is not None and spec.strip().startswith("ids:"):
        raise ConfigError(field, "the service takes ids as a list in `ids`, not a file path")
    return spec


def _action(body: EditRequest) -> tuple[str, str | None]:
    """(action, spec) of a request: exactly one of `remove`, `demote` and `ids`; `action` names what
    to do with `ids` and may only repeat the spec's field otherwise."""
    given = [name for name in ("remove", "demote", "ids") if getattr(body, name) is not None]
    if len(given) != 1:
        raise ConfigError("remove", "give exactly one of `remove` (a spec), `demote` (a spec) and `ids` (a list)")
    if given[0] == "ids":
        return body.action or "remove", None
    if body.action not in (None, given[0]):
        raise ConfigError("action", f"is {body.action!r} but the set is given as `{given[0]}`")
    return given[0], _server_spec(getattr(body, given[0]), given[0])


@router.get("/preview", name="audit_preview", responses=errors(409, 422))
def removal_preview(audit_id: str, owner: OwnerDep, session: SessionDep,
                    remove: Annotated[str, Query(max_length=200, description=REMOVAL_SPEC["description"],
                                                 json_schema_extra=REMOVAL_SPEC)]) -> dict:
    """Predicted change of the validation loss if the pairs `remove` names were dropped (stored numbers)."""
    audit = _finished(session, owner, audit_id)
    check_json_values(remove, "remove")
    return preview(audit.audit_dir, _server_spec(remove))


@router.post("/edits", status_code=202, response_model=EditCreated,
             responses={202: {"links": edit_links("$response.body#/edit_id")}, **errors(409, 422)})
def create(request: Request, audit_id: str, body: EditRequest, owner: OwnerDep, session: SessionDep,
           settings_: SettingsDep) -> EditCreated:
    """Queue an edit. Everything is checked here, before it is queued: the settings (bounds:
    EDIT_SETTINGS, in this schema), the removal set, `theta` against the audited model's parameter
    names (built without weights) and the zero-shot images."""
    audit = _finished(session, owner, audit_id)
    check_json_values(body.model_dump(), "")  # NUL, lone surrogates
    action, spec = _action(body)
    for name in ("ids", "keep"):
        if getattr(body, name) is not None and not 1 <= len(getattr(body, name)) <= MAX_IDS:
            raise ConfigError(name, f"give between 1 and {MAX_IDS} ids")
    if body.theta is not None:
        if not 1 <= len(body.theta) <= MAX_THETA_PATTERNS:
            raise ConfigError("theta", f"give between 1 and {MAX_THETA_PATTERNS} patterns")
        check_theta(Manifest.from_json(audit.manifest), body.theta)
    zero_shot = _confined_zero_shot(body.zero_shot, settings_.resolved_roots())
    settings = EditSettings.from_mapping(body.model_dump(exclude_unset=True))  # old names: deprecated
    method = body.method or METHODS[0]
    if method == "replay":  # the recipe it repeats: from the settings or the training sidecar, else a 422 now
        manifest = Manifest.from_json(audit.manifest)
        recipe_of(read_sidecar(manifest.checkpoint, manifest.adapter), manifest.options.seed,
                  settings.replay_epochs, settings.replay_lr)
    edit = repository.create_edit(session, audit, {})
    folder = location(edit.edit_dir)
    if body.ids is not None:
        write_text(folder / REQUEST_IDS, "".join(f"{i}\n" for i in body.ids))
        spec = f"ids:{REQUEST_IDS}"
    if body.keep is not None:
        write_text(folder / KEEP_IDS, "".join(f"{i}\n" for i in body.keep))
    try:  # a bad spec or keep list is a 422 before queueing
        chosen = removal_set(audit.audit_dir, spec, base_dir=folder, field=action,
                             keep=None if body.keep is None else KEEP_IDS)
    except ConfigError as exc:
        remove_tree(folder)
        raise ConfigError("ids", exc.message) if body.ids is not None and exc.field == action else exc
    edit.request = {"action": action, action: spec, "method": method, "pairs": len(chosen.ids), "kept_back": chosen.kept_back,
                    "keep": None if body.keep is None else KEEP_IDS, "theta": body.theta, "zero_shot": zero_shot,
                    **settings.as_dict()}
    session.commit()
    dispatch_or_fail(session, edit, request.app.state.dispatcher.start_edit, "edit")
    return EditCreated(edit_id=edit.id, status_url=str(request.url_for("edit_status", audit_id=audit_id,
                                                                       edit_id=edit.id)))


@router.get("/edits/{edit_id}", response_model=EditStatus, name="edit_status",
            responses={200: {"links": edit_links("$response.body#/id", status=False)}})
def status(request: Request, audit_id: str, edit_id: str, owner: OwnerDep, session: SessionDep) -> EditStatus:
    edit = _owned_edit(session, owner, audit_id, edit_id)
    return EditStatus(id=edit.id, audit_id=audit_id, status=edit.status, request=edit.request,
                      created_at=edit.created_at, finished_at=edit.finished_at, error=_redacted(request, edit.error), result=_redacted(request, edit.result),
                      checkpoint_url=str(request.url_for("edit_checkpoint", audit_id=audit_id, edit_id=edit.id)))


@router.get("/edits/{edit_id}/checkpoint", name="edit_checkpoint",
            responses={200: {"content": {"application/zip": {}}}, **errors(409)})
def checkpoint(audit_id: str, edit_id: str, owner: OwnerDep, session: SessionDep) -> StreamingResponse:
    """A zip of what the edit wrote: the checkpoint in the input's format (`model.pt` / `model.safetensors`
    with its training sidecar, or `adapter/` for a LoRA audit), `edit.json` and `removed_ids.txt`."""
    edit = _owned_edit(session, owner, audit_id, edit_id)
    if edit.status != "succeeded":
        raise HTTPException(409, f"edit is {edit.status}")
    folder = location(edit.edit_dir)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:  # from the store, local or a bucket
        for path in files_under(folder):
            if path.name not in (REQUEST_IDS, KEEP_IDS):
                archive.writestr(str(path.relative_to(folder)), path.read_bytes())
    buffer.seek(0)
    return StreamingResponse(buffer, media_type="application/zip",
                             headers={"Content-Disposition": f'attachment; filename="edit-{edit_id}.zip"'})


def _confined_zero_shot(raw: list[dict] | None, roots) -> list[dict] | None:
    """Zero-shot examples checked field by field, their images confined to the data roots now
    (and again when the worker opens them)."""
    if raw is None:
        return None
    if not 1 <= len(raw) <= MAX_ZERO_SHOT:
        raise ConfigError("zero_shot", f"give between 1 and {MAX_ZERO_SHOT} examples")
    zero_shot_examples(raw)
    if not roots:
        raise ConfigError("zero_shot", "the server has no data roots configured (ECIF_DATA_ROOTS)")
    out = []
    for i, example in enumerate(raw):
        image = check_confined(example["image"], roots, f"zero_shot[{i}].image")
        if not Path(image).is_file():
            raise ConfigError(f"zero_shot[{i}].image", "file not found")
        out.append({**example, "image": str(image)})
    return out


def _owned_edit(session, owner: str, audit_id: str, edit_id: str):
    return _owned_child(session, owner, audit_id, edit_id, repository.get_edit, "edit")
