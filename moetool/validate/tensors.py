"""Check 2, tensors: each FP8 tensor equals the block-FP8 recipe applied to the original, byte for byte
(scales bit for bit); copied and fused float tensors equal their source bytes. The other tensors
(attention, norms, embeddings, ...) are compared the same way, outside the layer steps too.

FP4 originals (DeepSeek-V4): each FP8 expert equals DeepSeek's cast of its FP4 source, byte for byte;
its dequantized values equal the FP4 values bit for bit in every block the cast keeps exactly, and
the blocks it does not keep are the ones moetool.json records (``fp4_lossy_blocks``)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from moetool.errors import InputError, MoetoolError
from moetool.plan import Src
from moetool.transforms import fp8_block
from moetool.validate.protocol import Context, Tensors
from moetool.validate.reads import LayerStep
from moetool.validate.regions import region_name, slice_field, stored_regions
from moetool.validate.report import Check

EQUAL_CHUNK = 1 << 24  # words compared per thread call on the CPU
#: bytes of originals quantized per call when a stack of experts is checked at once
STACK_BYTES = 512 << 20
#: bytes of float32 values made per call when a stack of FP4 experts is checked at once, by device type
#: (on the CPU they count against validate's memory, which stays within its read buffers plus headroom)
FP4_STACK_BYTES = {"cpu": 256 << 20, "cuda": 4 << 30}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return (
        t.contiguous().view(torch.uint8)
        if t.element_size() == 1
        else t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    )


def first_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...] | None:
    """The index of the first element whose bits differ (``()`` for different shapes), None if none."""
    if a.shape != b.shape:
        return ()
    ne = _bits(a) != _bits(b)
    if not bool(ne.any()):
        return None
    return tuple(int(i) for i in ne.nonzero()[0])


def _wide(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` as a flat view of the widest integer type that divides them (a comparison of
    int64 words runs several times faster than one of bytes)."""
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if flat.numel() % size == 0 and flat.storage_offset() % size == 0:
            return flat.view(dtype)
    return flat


def same_bytes(a: torch.Tensor, b: torch.Tensor, pool: ThreadPoolExecutor | None) -> bool:
    """Whether two tensors of one shape hold the same bytes; large CPU tensors are compared in pieces on
    ``pool`` (torch releases the GIL)."""
    if a.dtype != b.dtype:
        return False
    x, y = _wide(a), _wide(b)
    if x.dtype != y.dtype:  # differently aligned: compare element by element
        x, y = _bits(a).reshape(-1), _bits(b).reshape(-1)
    if pool is None or x.device.type != "cpu" or x.numel() <= EQUAL_CHUNK:
        return torch.equal(x, y)
    parts = [(x[i : i + EQUAL_CHUNK], y[i : i + EQUAL_CHUNK]) for i in range(0, x.numel(), EQUAL_CHUNK)]
    return all(pool.map(lambda p: torch.equal(*p), parts))


class TensorsCheck:
    """The tensors check of each layer (a :class:`~moetool.validate.protocol.LayerCheck`: experts
    compared up to the layer's first mismatch, the quantization error of the first one reported), and
    of the other tensors, each compared where it is read and reported in name order."""

    group = "tensors"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._bad: str | None = None
        self._errs: list[float] = []
        self._others: dict[str, str | Exception | None] = {}
        self._lossy = _recorded_lossy(ctx.conv.manifest)

    # -- the layer check ----------------------------------------------------------------------------
    def wants(self, step: LayerStep) -> bool:
        return step.tensors is not None

    def start(self, step: LayerStep, batch: Tensors) -> None:
        self._bad, self._errs = None, []

    def part(self, step: LayerStep, batch: Tensors, experts: list[int]) -> None:
        """Compare the step's sampled experts among ``experts`` with the recipe, up to the first mismatch
        of the layer; the error statistics come from the first expert of the sample."""
        assert step.tensors is not None and step.conv is not None
        if self._bad:
            return
        wanted = set(step.tensors)
        first = step.tensors[0]
        todo = [e for e in experts if e in wanted]
        # the first expert's error statistics come from the per-region path below
        proven = self._stacks_equal(step, batch, [e for e in todo if e != first])
        for e in todo:
            if e in proven:
                continue
            bad: str | None = None
            if step.conv.whole_scales:
                bad = self._compare_sm100(step, batch, e)
            else:
                for j, csrc in enumerate(stored_regions(self.ctx.conv, step.layer, e)):
                    osrc, orig = self.ctx.orig_region(step, batch, e, j)
                    got = step.conv.region(batch, e, j)
                    bad = self._compare(csrc, osrc, got, orig, self._errs if e == first else None)
                    if bad:
                        break
            if bad:
                self._bad = bad
                return

    def _stacks_equal(self, step: LayerStep, b: Tensors, experts: list[int]) -> set[int]:
        """The experts among ``experts`` whose three regions are shown equal to the recipe by applying it
        to their stacked originals at once, up to ``STACK_BYTES`` of originals per call: a chunk's
        experts cost a few launches and synchronisations instead of several per region, which on a GPU
        is what the check's time went to (the data are already on the device). Only where a stack's
        blocks are its regions' blocks: float or block-FP8 originals, FP8 experts, per-region scale rows
        on both sides, every region starting on a block boundary. FP4 originals (DeepSeek-V4) are cast a
        stack at a time, in chunks of up to ``FP4_STACK_BYTES`` of float32 values; an expert moetool.json
        lists as lossy, or a chunk with a lossy block, is not proven here. Anything else, a difference or
        an error included, is left to the per-region comparison, which reports it exactly as it always
        has; these are only ever proofs of equality, so the report is the same either way."""
        o, c = step.orig, step.conv
        aligned = (
            [(r0 // fp8_block.BLOCK, fp8_block.cdiv(r1, fp8_block.BLOCK)) for r0, r1 in c.parts] if c else []
        )
        if (
            not experts
            or o is None
            or c is None
            or not c.fp8
            or c.whole_scales
            or o.whole_scales
            or o.int4_group
            or o.parts != c.parts
            or any(r0 % fp8_block.BLOCK for r0, _ in c.parts)
            or c.sparts != aligned
            or (o.fp8 and o.sparts != aligned)
        ):
            return set()
        ours = [e for e in experts if e in o.pos and e in c.pos]  # fused slots come from the shared expert
        w13, w2 = b["o|w13"], b["o|w2"]
        if not len(w13):
            return set()
        if o.fp4:
            if w13.dtype not in (torch.int8, torch.uint8):
                return set()
            # two float32 values per FP4 byte, in two tensors (the cast's and the original's) at a time
            per = (w13[0].numel() + w2[0].numel()) * 2 * 4 * 2
            budget = FP4_STACK_BYTES.get(torch.device(self.ctx.device).type, FP4_STACK_BYTES["cpu"])
            return self._prove_chunks(step, b, self._fp4_unlisted(step, ours), budget // per, self._fp4_cast)
        if o.fp8 != (w13.dtype == torch.float8_e4m3fn) or not w13.dtype.is_floating_point:
            return set()
        per = (w13[0].numel() + w2[0].numel()) * w13.element_size()
        return self._prove_chunks(step, b, ours, STACK_BYTES // max(per, 1), self._expected_stack)

    def _prove_chunks(
        self,
        step: LayerStep,
        b: Tensors,
        experts: list[int],
        n: int,
        expected: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor] | None],
    ) -> set[int]:
        """The experts among ``experts`` proven ``n`` at a time, up to the first chunk that is not: for a
        chunk's gate/up stack and its down stack, ``expected(originals, their scales or None)`` gives the
        converted FP8 bytes and scales, or None where it cannot prove them."""
        o, c = step.orig, step.conv
        assert o is not None and c is not None
        n = max(1, n)
        proven: set[int] = set()
        for i in range(0, len(experts), n):
            group = experts[i : i + n]
            for w, s in (("w13", "s13"), ("w2", "s2")):
                scales = o.select(b["o|" + s], group) if o.fp8 or o.fp4 else None
                try:
                    want = expected(o.select(b["o|" + w], group), scales)
                except MoetoolError:  # the per-region path names the region and the block
                    return proven
                if want is None:
                    return proven
                want_q, want_s = want
                got_q = c.select(b["c|" + w], group).to(want_q.device)
                got_s = c.select(b["c|" + s], group).to(want_q.device).float()
                if got_s.shape != want_s.shape or not (
                    same_bytes(got_q, want_q, self.ctx.pool)
                    and same_bytes(got_s, want_s.float(), self.ctx.pool)
                ):
                    return proven
            proven.update(group)
        return proven

    def _fp4_unlisted(self, step: LayerStep, experts: list[int]) -> list[int]:
        """``experts`` less those with a source moetool.json lists as lossy (the per-region path checks
        the list)."""
        from moetool.validate.regions import expected_sources

        if self._lossy is None or not self._lossy[0]:
            return experts
        listed = self._lossy[0]

        def clean(e: int) -> bool:
            gu, d = expected_sources(self.ctx.orig, self.ctx.conv, step.layer, e)
            return not any(src.describe() in listed for src in (*gu, d))

        return [e for e in experts if clean(e)]

    def _fp4_cast(
        self, packed: torch.Tensor, scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """DeepSeek's cast of stacked FP4 experts on the device, where it changes no value and its FP8
        values equal the FP4 values exactly (both dequantized by the torch references, independently of
        the cast kernel); None where a block is lossy."""
        from moetool.kernels.fp4_cast_ref import dequant_fp4_ref

        assert scale is not None
        q, s, changed = self._expected_fp4((packed, scale))
        if bool(changed.any()) or not torch.equal(
            fp8_block.dequantize(q, s.float()), dequant_fp4_ref(packed.to(q.device), scale.to(q.device))
        ):
            return None
        return q, s

    def _expected_stack(
        self, w: torch.Tensor, s: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What the FP8 policy makes of stacked original experts ``w [n, R, C]`` (block FP8 with scales
        ``s`` when not None) on the device; None for an FP8 stack that ``fp8_block.check_source`` would
        refuse somewhere (the per-region path then says where)."""
        dev, ue8m0 = self.ctx.device, self.ctx.ue8m0
        if s is None:
            return fp8_block.quantize(w.to(dev), ue8m0=ue8m0)
        q, sf = w.to(dev), s.to(dev).float()
        if not fp8_block.source_is_sound(q, sf):
            return None
        return fp8_block.expected_fp8(q, sf, ue8m0=ue8m0, name=None, device=dev)

    def result(self, step: LayerStep, batch: Tensors) -> Check:
        """The layer's record; the other tensors read with the layer are compared now, from ``batch``."""
        assert step.tensors is not None
        layer, experts, bad, errs = step.layer, step.tensors, self._bad, self._errs
        metric = f"{len(experts)} experts byte-equal"
        value = "mismatch" if bad else (f"rel err {max(errs):.2e} (expert {experts[0]})" if errs else "equal")
        check = Check("tensors", f"layer {layer}", metric, value, "bytes equal", bad is None, bad or "")
        self.compare_others(step.others, batch)
        return check

    # -- the other tensors --------------------------------------------------------------------------
    def compare_others(
        self, names: list[str], batch: Tensors, rows: dict[str, tuple[int, int]] | None = None
    ) -> None:
        """Compare non-expert tensors with their originals (an error that stops a comparison is kept, to
        be raised only where the report reaches that tensor). ``rows``: the tensors ``batch`` holds only
        a run of rows of (``OthersStep.rows``), compared in row order, run after run: a difference is
        reported where it lies in the whole tensor, as if it had been compared whole."""
        for name in names:
            span = (rows or {}).get(name)
            if span is not None and self._others.get(name) is not None:
                continue  # an earlier run of its rows already differs (or failed)
            try:
                src = Src(name)
                got = slice_field(batch, "c", src, self.ctx.c_ck.root)
                orig = slice_field(batch, "o", src, self.ctx.o_ck.root)
                at, region = (0, None) if span is None else (span[0], Src(name, rows=span))
                self._others[name] = self._compare(src, src, got, orig, None, at=at, region=region)
            except MoetoolError as e:
                self._others[name] = e

    def others_result(self, names: list[str]) -> Check:
        """The other tensors' record: counted in name order up to the first mismatch, and an error met
        comparing one is raised only if no earlier tensor mismatched, whatever order they were read in."""
        bad, count = None, 0
        for name in names:
            count += 1
            result = self._others[name]
            if isinstance(result, Exception):
                raise result
            if result:
                bad = result
                break
        return Check(
            "tensors",
            "other tensors",
            f"{count} tensors",
            "mismatch" if bad else "equal",
            "bytes equal",
            bad is None,
            bad or "",
        )

    # -- comparing ----------------------------------------------------------------------------------
    def _expected_quant(
        self, src: Src, orig: tuple[torch.Tensor, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the FP8 policy makes of an original region, on the device: block FP8 of a float region;
        for an FP8 region its own bytes or its requantization (``fp8_block.expected_fp8``)."""
        dev, ue8m0 = self.ctx.device, self.ctx.ue8m0
        t, s = orig
        try:
            if s is None:
                return fp8_block.quantize(t.to(dev), ue8m0=ue8m0, name=src.describe())
            # a corrupt FP8 original is refused, as quantize refuses it
            origin = (src.rows[0] if src.rows else 0, src.cols[0] if src.cols else 0)
            fp8_block.check_source(t, s, name=src.name, origin=origin, expert=src.expert)
            return fp8_block.expected_fp8(t.to(dev), s.to(dev), ue8m0=ue8m0, name=src.describe(), device=dev)
        except InputError as e:
            if e.file is None:  # the original's defect (exit 2), named with its file
                e.file = (
                    self.ctx.o_ck.info(src.name).file
                    if src.name in self.ctx.o_ck
                    else str(self.ctx.o_ck.root)
                )
            raise

    def _first_diff(self, a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...] | None:
        if a.shape != b.shape:
            return ()
        if same_bytes(a, b, self.ctx.pool):
            return None
        return first_diff(a, b)

    def _fp8_differs(
        self,
        conv_src: Src,
        got: tuple[torch.Tensor, torch.Tensor],
        want: tuple[torch.Tensor, torch.Tensor],
        source: str,
        recipe: str,
        at: int = 0,
    ) -> str | None:
        """None when FP8 bytes and scales are ``want``'s, else where the first differ (the bytes made
        from ``source``; the scales by ``recipe``), rows counted from row ``at`` (a 128-block boundary)."""
        (got_q, got_s), (want_q, want_s) = got, want
        pos = self._first_diff(got_q, want_q)
        if pos is not None:
            return f"{region_name(conv_src)} FP8 bytes differ from {source} at {_shifted(pos, at)}"
        pos = self._first_diff(got_s.float(), want_s.float())
        if pos is not None:
            return (
                f"{region_name(conv_src, scale=True, tensors=self.ctx.c_ck.tensors)} differs from {recipe} "
                f"at block {_shifted(pos, at // fp8_block.BLOCK)} "
                f"({float(got_s.float()[pos]):.9g} vs {float(want_s.float()[pos]):.9g})"
            )
        return None

    def _expected_fp4(
        self, orig: tuple[torch.Tensor, torch.Tensor | None], name: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DeepSeek's cast of FP4 originals (a region, or stacked experts) on the device (Triton on CUDA,
        the torch reference on the CPU: same bytes): FP8 bytes, E8M0 scales and the changed elements per
        block; an error names ``name``."""
        t, s = orig
        assert s is not None
        from moetool.kernels import dispatch

        t, s = t.to(self.ctx.device).contiguous(), s.to(self.ctx.device).contiguous()
        return dispatch.fp4_cast(t, s, name=name)

    def _compare_fp4(
        self,
        conv_src: Src,
        orig_src: Src,
        got: tuple[torch.Tensor, torch.Tensor],
        orig: tuple[torch.Tensor, torch.Tensor | None],
        errs: list[float] | None,
    ) -> str | None:
        """None when the converted FP8 region is DeepSeek's cast of its FP4 source, exact wherever the
        cast is and lossy exactly where moetool.json says, else why."""
        from moetool.kernels.fp4_cast_ref import FP8_BLOCK, dequant_fp4_ref

        want_q, want_s, changed = self._expected_fp4(orig, orig_src.describe())
        got_q, got_s = got[0].to(want_q.device), got[1].to(want_q.device)
        why = self._fp8_differs(
            conv_src,
            (got_q, got_s),
            (want_q, want_s),
            f"DeepSeek's cast of {orig_src.describe()}",
            "the cast",
        )
        if why is not None:
            return why
        exact = dequant_fp4_ref(orig[0].to(want_q.device), orig[1].to(want_q.device))  # type: ignore[union-attr]
        back = fp8_block.dequantize(got_q, got_s.float())
        moved = (back != exact).unflatten(-1, (-1, FP8_BLOCK)).unflatten(-3, (-1, FP8_BLOCK))
        moved = moved.sum(dim=(-3, -1), dtype=torch.int32)
        if not torch.equal(moved, changed):
            rb, cb = (int(i) for i in (moved != changed).nonzero()[0])
            return (
                f"{region_name(conv_src)}: dequantized values of block ({rb}, {cb}) differ from the FP4 "
                f"original in {int(moved[rb, cb])} places, the cast changes {int(changed[rb, cb])}"
            )
        if self._lossy is not None:
            listed, complete = self._lossy
            found = {(int(r), int(c)): int(changed[r, c]) for r, c in changed.nonzero().tolist()}
            recorded = listed.get(orig_src.describe(), {})
            if found != recorded and (complete or any(recorded.get(k, v) != v for k, v in found.items())):
                return (
                    f"{region_name(conv_src)}: moetool.json records {len(recorded)} lossy FP4 blocks for "
                    f"{orig_src.describe()}, the cast makes {len(found)}"
                )
        if errs is not None:
            errs.append(float((back - exact).norm() / exact.norm().clamp_min(1e-30)))
        return None

    def _compare(
        self,
        conv_src: Src,
        orig_src: Src,
        got: tuple[torch.Tensor, torch.Tensor | None],
        orig: tuple[torch.Tensor, torch.Tensor | None],
        errs: list[float] | None,
        *,
        at: int = 0,
        region: Src | None = None,
    ) -> str | None:
        """None when the converted region is what the recipe makes of the original region, else why.
        ``got``/``orig`` may hold only the rows of ``region`` (a run of the rows of ``orig_src``, from
        row ``at`` on): a difference is then reported at its place in the whole tensor."""
        display = region_name(conv_src)
        got_q, got_s = got
        if got_s is None:  # not quantized: bytes must equal the source's
            want = orig[0].to(got_q.device)
            pos = self._first_diff(got_q, want)
            return (
                None
                if pos is None
                else f"{display} differs from {orig_src.describe()} at {_shifted(pos, at)}"
            )
        if orig[0].dtype == torch.int8 and orig[1] is not None:  # DeepSeek-V4 FP4 experts
            return self._compare_fp4(conv_src, orig_src, (got_q, got_s), orig, errs)
        want_q, want_s = self._expected_quant(region or orig_src, orig)
        got_q, got_s = got_q.to(want_q.device), got_s.to(want_q.device)
        why = self._fp8_differs(
            conv_src,
            (got_q, got_s),
            (want_q, want_s),
            f"the recipe applied to {orig_src.describe()}",
            "the recipe",
            at,
        )
        if why is not None:
            return why
        w = orig[0]
        if errs is not None and w.dtype != torch.float8_e4m3fn:  # quantization error for the report
            wf = w.to(self.ctx.device).float()
            d = fp8_block.dequantize(got_q, got_s)
            errs.append(float((d - wf).norm() / wf.norm().clamp_min(1e-30)))
        return None

    def _compare_sm100(self, step: LayerStep, b: Tensors, e: int) -> str | None:
        assert step.conv is not None
        names = self.ctx.conv.stores[step.layer].stacked
        k = step.conv.pos[e]
        for tag, parts in (("w13", (0, 1)), ("w2", (2,))):
            expected = []
            for j in parts:
                src, orig = self.ctx.orig_region(step, b, e, j)
                if orig[0].dtype == torch.int8:  # FP4: DeepSeek's cast, its E8M0 bytes packed as they are
                    expected.append(self._expected_fp4(orig, src.describe())[:2])
                else:
                    expected.append(self._expected_quant(src, orig))
            want_q = torch.cat([p[0] for p in expected])
            scales = torch.cat([p[1] for p in expected])
            if scales.dtype == torch.float8_e8m0fnu:
                want_s = fp8_block.sm100_pack_exponents(scales.view(torch.uint8), want_q.shape[0])
            else:
                want_s = fp8_block.sm100_pack(scales, want_q.shape[0])
            got_q = b[f"c|{tag}"][k]
            got_s = b[f"c|{'s13' if tag == 'w13' else 's2'}"][k]
            pos = self._first_diff(got_q, want_q)
            if pos is not None:
                return f"{names[tag + '_weight']}[{e}] FP8 bytes differ from the recipe at {list(pos)}"
            pos = self._first_diff(got_s, want_s.reshape(got_s.shape))
            if pos is not None:
                return f"{names[tag + '_weight_scale_inv']}[{e}] packed scales differ at {list(pos)}"
        return None


def _shifted(pos: tuple[int, ...], rows: int) -> list[int]:
    """Index ``pos`` of a run of rows starting at row ``rows``, as an index of the whole tensor."""
    return [pos[0] + rows, *pos[1:]] if pos else list(pos)


def _recorded_lossy(manifest: dict | None) -> tuple[dict[str, dict[tuple[int, int], int]], bool] | None:
    """The lossy FP4 blocks moetool.json records, by source tensor, and whether the list is complete;
    None when it records none (not an FP4 conversion)."""
    rec = manifest.get("fp4_lossy_blocks") if isinstance(manifest, dict) else None
    if not isinstance(rec, dict):
        return None
    listed: dict[str, dict[tuple[int, int], int]] = {}
    try:
        for item in rec.get("listed") or []:
            block = tuple(int(v) for v in item["block"])
            listed.setdefault(str(item["tensor"]), {})[block] = int(item["changed"])  # type: ignore[index]
        return listed, len(rec.get("listed") or []) == int(rec.get("blocks", 0))
    except (KeyError, TypeError, ValueError):  # a malformed record records nothing: every block is judged
        return None
