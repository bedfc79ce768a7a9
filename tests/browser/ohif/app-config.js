/** @type {AppTypes.Config} */
// OHIF 3.13 configuration for the browser tests: DICOMweb data sources that talk to the
// archive directly, from another origin, with no proxy. tests/browser/conftest.py replaces
// __ANIM_DICOMWEB__ with the running archive's root (http://127.0.0.1:PORT/dicom-web) and
// serves this file as /app-config.js beside OHIF's own dist/ (whose default points at
// OHIF's public demo server).
//
// Two sources cover the two ways OHIF deployments ask for pixels and thumbnails:
//   anim        (default, /viewer?...)       unquoted multipart Accept, thumbnails drawn
//                                             from the frames in the browser;
//   anim-quoted (/viewer/anim-quoted?...)    quoted Accept (type="application/octet-stream",
//                                             a CORS preflight per frame request) and the
//                                             server's /thumbnail, as OHIF's own default.
const anim = {
  friendlyName: 'ANIM archive',
  name: 'anim',
  qidoRoot: '__ANIM_DICOMWEB__',
  wadoRoot: '__ANIM_DICOMWEB__',
  wadoUriRoot: '__ANIM_DICOMWEB__',
  // The archive answers includefield, so OHIF asks for the columns it shows.
  qidoSupportsIncludeField: true,
  supportsReject: false,
  supportsFuzzyMatching: false,
  supportsWildcard: true,
  imageRendering: 'wadors',
  thumbnailRendering: 'wadors',
  enableStudyLazyLoad: true,
  // Not a static-file DICOMweb: the archive filters QIDO itself.
  staticWado: false,
  singlepart: 'bulkdata,video',
  bulkDataURI: { enabled: true, relativeResolution: 'studies' },
  // Accept: multipart/related; type=application/octet-stream; transfer-syntax=*
  omitQuotationForMultipartRequest: true,
};

window.config = {
  name: 'anim-browser-test',
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  // The static server sends COOP/COEP, so the page is cross-origin isolated; nothing to warn.
  showWarningMessageForCrossOrigin: true,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 25 },
  showErrorDetails: 'always',
  // No investigational-use dialog: it would cover the viewport in screenshots.
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'anim',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'anim',
      configuration: anim,
    },
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'anim-quoted',
      configuration: {
        ...anim,
        name: 'anim-quoted',
        friendlyName: 'ANIM archive (quoted Accept, server thumbnails)',
        thumbnailRendering: 'thumbnail',
        thumbnailRequestStrategy: 'fetch',
        // Accept: multipart/related; type="application/octet-stream"; transfer-syntax="*"
        omitQuotationForMultipartRequest: false,
      },
    },
  ],
};
