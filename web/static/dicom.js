// Shared helpers: talking to the archive, reading DICOM JSON (PS3.18 F.2), building DOM.
// Text from the archive only ever reaches the page as text nodes (el() below), never
// as HTML, so a patient name cannot inject markup.

export const DW = "/dicom-web";

export class HttpError extends Error {
  constructor(status, reason) {
    super(reason ? `${status}: ${reason}` : `HTTP ${status}`);
    this.status = status;
  }
}

async function fetchJSON(url) {
  const resp = await fetch(url, { headers: { Accept: "application/dicom+json, application/json" } });
  if (!resp.ok) {
    let reason = "";
    try { reason = (await resp.json()).reason || ""; } catch { /* not JSON */ }
    throw new HttpError(resp.status, reason);
  }
  return { data: await resp.json(), headers: resp.headers };
}

// GET a JSON resource; a 4xx/5xx becomes an HttpError with the archive's reason.
export async function getJSON(url) {
  return (await fetchJSON(url)).data;
}

const MAX_RESULTS = 100000;

// Every result of a QIDO search, page after page: the archive cuts an answer at its
// maximum ([web].qido_max_results) and says so in a Warning: 299 header; the next page
// starts where that one stopped (docs/dicomweb.md: paging never repeats or skips).
export async function searchAll(path, params, pageSize = 1000) {
  const out = [];
  while (out.length < MAX_RESULTS) {
    const { data, headers } = await fetchJSON(
      `${path}${query({ ...params, limit: pageSize, offset: out.length })}`);
    out.push(...data);
    const cut = /exceeded/i.test(headers.get("Warning") || "");
    if (!data.length || (data.length < pageSize && !cut)) break;
  }
  return out;
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.append(k, String(v));
  }
  // a comma needs no escape in a query (RFC 3986) and reads better: window=40,400
  const s = q.toString().replace(/%2C/gi, ",");
  return s ? `?${s}` : "";
}

// ---- DICOM JSON ----------------------------------------------------------------------

export function values(ds, tag) {
  const e = ds && ds[tag];
  return e && Array.isArray(e.Value) ? e.Value : [];
}

export function first(ds, tag) {
  const v = values(ds, tag);
  if (!v.length) return "";
  const x = v[0];
  if (x && typeof x === "object" && "Alphabetic" in x) return x.Alphabetic || "";
  return x;
}

export function num(ds, tag, fallback = 0) {
  const x = Number(first(ds, tag));
  return Number.isFinite(x) && first(ds, tag) !== "" ? x : fallback;
}

// DOE^JANE^^DR -> "DOE, JANE"; components beyond the given name are kept after a space.
export function personName(pn) {
  if (!pn) return "";
  const [family = "", given = "", middle = "", prefix = "", suffix = ""] = String(pn).split("^");
  const rest = [prefix, given, middle].filter(Boolean).join(" ");
  return [family, rest].filter(Boolean).join(", ") + (suffix ? ` ${suffix}` : "");
}

export function fmtDate(da) {
  const s = String(da || "");
  return /^\d{8}$/.test(s) ? `${s.slice(0, 4)}-${s.slice(4, 6)}-${s.slice(6, 8)}` : s;
}

export function fmtTime(tm) {
  const s = String(tm || "");
  return /^\d{4}/.test(s) ? `${s.slice(0, 2)}:${s.slice(2, 4)}` : s;
}

export function fmtBytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB", "PB"];
  let i = 0;
  let x = n;
  while (Math.abs(x) >= 1000 && i < units.length - 1) { x /= 1000; i += 1; }
  return `${i ? x.toFixed(x < 10 ? 2 : 1) : x} ${units[i]}`;
}

export function fmtInt(n) {
  return typeof n === "number" ? n.toLocaleString("en") : "–";
}

export function fmtDateTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const p = (x) => String(x).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
    `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

// One attribute value as text, for the attribute panel.
export function valueText(elem) {
  if (!elem) return "";
  if (elem.BulkDataURI) return "(bulk data)";
  if (elem.InlineBinary) return `(binary, ${Math.floor(elem.InlineBinary.length * 3 / 4)} bytes)`;
  if (!Array.isArray(elem.Value)) return "";
  if (elem.vr === "SQ") return `${elem.Value.length} item${elem.Value.length === 1 ? "" : "s"}`;
  return elem.Value.map((v) => (v && typeof v === "object" ? (v.Alphabetic ?? JSON.stringify(v)) : String(v))).join("\\");
}

// Common attribute keywords (PS3.6), enough for the panel to be readable; others show
// their tag and VR only.
export const KEYWORDS = {
  "00020010": "TransferSyntaxUID",
  "00080005": "SpecificCharacterSet", "00080008": "ImageType", "00080012": "InstanceCreationDate",
  "00080013": "InstanceCreationTime", "00080016": "SOPClassUID", "00080018": "SOPInstanceUID",
  "00080020": "StudyDate", "00080021": "SeriesDate", "00080022": "AcquisitionDate",
  "00080023": "ContentDate", "00080030": "StudyTime", "00080031": "SeriesTime",
  "00080032": "AcquisitionTime", "00080033": "ContentTime", "00080050": "AccessionNumber",
  "00080060": "Modality", "00080061": "ModalitiesInStudy", "00080064": "ConversionType",
  "00080070": "Manufacturer", "00080080": "InstitutionName", "00080090": "ReferringPhysicianName",
  "00081010": "StationName", "00081030": "StudyDescription", "0008103E": "SeriesDescription",
  "00081040": "InstitutionalDepartmentName", "00081090": "ManufacturerModelName",
  "00100010": "PatientName", "00100020": "PatientID", "00100021": "IssuerOfPatientID",
  "00100030": "PatientBirthDate", "00100040": "PatientSex", "00101010": "PatientAge",
  "00101020": "PatientSize", "00101030": "PatientWeight",
  "00180015": "BodyPartExamined", "00180050": "SliceThickness", "00180060": "KVP",
  "00180088": "SpacingBetweenSlices", "00181020": "SoftwareVersions",
  "00181030": "ProtocolName", "00181063": "FrameTime", "00181150": "ExposureTime",
  "00181151": "XRayTubeCurrent", "00181152": "Exposure", "00181210": "ConvolutionKernel",
  "00185100": "PatientPosition", "00180080": "RepetitionTime", "00180081": "EchoTime",
  "00180087": "MagneticFieldStrength", "00181314": "FlipAngle",
  "0020000D": "StudyInstanceUID", "0020000E": "SeriesInstanceUID", "00200010": "StudyID",
  "00200011": "SeriesNumber", "00200012": "AcquisitionNumber", "00200013": "InstanceNumber",
  "00200020": "PatientOrientation", "00200032": "ImagePositionPatient",
  "00200037": "ImageOrientationPatient", "00200052": "FrameOfReferenceUID",
  "00201041": "SliceLocation", "00201206": "NumberOfStudyRelatedSeries",
  "00201208": "NumberOfStudyRelatedInstances", "00201209": "NumberOfSeriesRelatedInstances",
  "00280002": "SamplesPerPixel", "00280004": "PhotometricInterpretation",
  "00280006": "PlanarConfiguration", "00280008": "NumberOfFrames",
  "00280009": "FrameIncrementPointer", "00280010": "Rows", "00280011": "Columns",
  "00280030": "PixelSpacing", "00280034": "PixelAspectRatio", "00280100": "BitsAllocated",
  "00280101": "BitsStored", "00280102": "HighBit", "00280103": "PixelRepresentation",
  "00280106": "SmallestImagePixelValue", "00280107": "LargestImagePixelValue",
  "00281050": "WindowCenter", "00281051": "WindowWidth", "00281052": "RescaleIntercept",
  "00281053": "RescaleSlope", "00281054": "RescaleType", "00281055": "WindowCenterWidthExplanation",
  "00282110": "LossyImageCompression", "00282112": "LossyImageCompressionRatio",
  "00282114": "LossyImageCompressionMethod",
  "00400244": "PerformedProcedureStepStartDate", "00400245": "PerformedProcedureStepStartTime",
  "00400275": "RequestAttributesSequence", "00081190": "RetrieveURL",
  "7FE00010": "PixelData", "7FE00008": "FloatPixelData", "7FE00009": "DoubleFloatPixelData",
};

export const MODALITIES = ["CT", "MR", "CR", "DX", "MG", "US", "NM", "PT", "XA", "RF", "OT", "SC",
  "SR", "SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "IO", "OP", "ES", "XC", "DOC", "KO", "PR"];

// ---- DOM ----------------------------------------------------------------------------

// el("a", {href: "#/"}, "text", child, ...): attributes as strings; "on*" keys are
// listeners; a boolean false/null attribute is left out.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else if (v === true) node.setAttribute(k, "");
    else node.setAttribute(k, String(v));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(node, c);
    else node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function errorBox(err, what) {
  const status = err instanceof HttpError ? err.status : 0;
  const why = status === 404 ? "not found" : err.message;
  return el("p", { class: "error", role: "alert" }, `Could not load ${what}: ${why}.`);
}

// Short form of a UID for tables (the full one in the title attribute).
export function shortUID(uid) {
  const s = String(uid || "");
  return s.length > 22 ? `…${s.slice(-18)}` : s;
}
