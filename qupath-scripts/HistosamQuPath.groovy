/*
 * histosam's QuPath layer: the QuPath / JavaFX / JTS calls shared by histosam_interactive,
 * histosam_refine and histosam_batch_boxes. It only moves things between QuPath and
 * HistosamClient.groovy (passed in as the map `H`): reading a region's pixels, finding the
 * Positive / Negative points, turning the rings the server returns into ROIs and back.
 * Which points count, when to call the server, retries and error messages live in
 * HistosamClient.groovy, which histosam's tests run against a real server.
 *
 * Written for QuPath 0.5 / 0.6 (Groovy 4, Java 21) in the Groovy subset that also parses
 * under Groovy 2.4 (closures, no Java lambdas). This file is `evaluate`d, so QuPath's default
 * script imports do not apply here: everything is imported explicitly.
 */

import javafx.application.Platform
import org.locationtech.jts.geom.Coordinate
import org.locationtech.jts.geom.Geometry
import org.locationtech.jts.geom.GeometryFactory
import org.locationtech.jts.geom.LineString
import org.locationtech.jts.geom.LinearRing
import org.locationtech.jts.geom.Polygon
import org.locationtech.jts.geom.util.GeometryFixer
import org.slf4j.Logger
import org.slf4j.LoggerFactory
import qupath.lib.gui.QuPathGUI
import qupath.lib.gui.images.servers.RenderedImageServer
import qupath.lib.images.ImageData
import qupath.lib.objects.PathObject
import qupath.lib.objects.PathObjects
import qupath.lib.objects.classes.PathClass
import qupath.lib.objects.hierarchy.PathObjectHierarchy
import qupath.lib.objects.hierarchy.events.PathObjectHierarchyEvent
import qupath.lib.objects.hierarchy.events.PathObjectHierarchyListener
import qupath.lib.regions.ImagePlane
import qupath.lib.regions.RegionRequest
import qupath.lib.roi.GeometryTools
import qupath.lib.roi.RectangleROI
import qupath.lib.roi.interfaces.ROI

import javax.imageio.ImageIO
import java.awt.Graphics2D
import java.awt.image.BufferedImage
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors
import java.util.concurrent.ThreadFactory
import java.util.concurrent.atomic.AtomicReference

class HistosamQuPathLayer {
    static final Logger logger = LoggerFactory.getLogger('histosam')
    static final String LIVE_KEY = 'histosam.live'
    static final String POSITIVE = 'Positive'
    static final String NEGATIVE = 'Negative'
    static final String IOU = 'predicted IoU'
    static final String PROPAGATED = 'histosam click propagation'

    final Map H
    final File dir
    final QuPathGUI qupath
    final Map store

    HistosamQuPathLayer(Map H, File dir) {
        this.H = H
        this.dir = dir
        this.qupath = QuPathGUI.getInstance()
        // Kept on the main window for the whole QuPath session: the gRPC channel (one per
        // server) and the live session, so later script runs reuse / stop them.
        this.store = qupath != null ? qupath.getStage().getProperties() : new HashMap()
    }

    /** Entry point of the three scripts; every failure ends as one line in QuPath's log. */
    void run(String mode) {
        try {
            if (mode == 'interactive' || mode == 'refine') {
                Map previous = store.get(LIVE_KEY) as Map
                if (previous != null) {
                    stopLive()
                    if (previous.mode == mode) {
                        return  // running the script again finishes the session
                    }
                }
                if (mode == 'interactive') {
                    startInteractive()
                } else {
                    startRefine()
                }
            } else if (mode == 'batch') {
                batchBoxes()
            } else {
                fail("histosam: unknown mode ${mode}")
            }
        } catch (Throwable e) {
            report(e)
        }
    }

    private Object connect() {
        Object client = H.connect(dir, store)
        client.log = { String message -> logger.info(message) }
        logger.info("histosam: ${client.settings.describe()}")
        return client
    }

    private void fail(String message) {
        throw H.Exception.newInstance(message)
    }

    /** A HistosamException is a message for the user; anything else is a bug: log its trace. */
    void report(Throwable e) {
        if (e.getClass().getSimpleName() == 'HistosamException') {
            logger.error(e.getMessage())
            notify(e.getMessage())
        } else {
            logger.error("histosam: unexpected error: ${e}", e)
            notify("histosam: unexpected error: ${e}; see the log")
        }
    }

    private static void notify(String message) {
        try {
            // qupath.fx.dialogs.Dialogs in 0.5/0.6; looked up by name so a rename cannot break the script.
            Class dialogs = Class.forName('qupath.fx.dialogs.Dialogs')
            Platform.runLater({ dialogs.showErrorNotification('histosam', message) } as Runnable)
        } catch (Throwable ignored) {
            // headless or another QuPath: the log line is enough
        }
    }

    // ------------------------------------------------------------------ image and regions

    private ImageData currentImageData() {
        ImageData imageData = qupath?.getViewer()?.getImageData()
        if (imageData == null) {
            fail('histosam: open an image in the viewer first')
        }
        return imageData
    }

    private static Map boundsOf(ROI roi) {
        return [x: roi.getBoundsX(), y: roi.getBoundsY(), width: roi.getBoundsWidth(), height: roi.getBoundsHeight()]
    }

    /** What the viewer shows, clipped to the image. */
    private Map viewerRegion(ImageData imageData) {
        def bounds = qupath.getViewer().getDisplayedRegionShape().getBounds2D()
        def server = imageData.getServer()
        return H.Geometry.paddedRegion(bounds.getX(), bounds.getY(), bounds.getWidth(), bounds.getHeight(), 0d,
                (double) server.getWidth(), (double) server.getHeight())
    }

    /**
     * (region, downsample) -> [PNG bytes, effective downsample], read from the image server.
     * Non-RGB images (fluorescence, 16-bit) are sent as the viewer renders them.
     */
    private Closure pixelReader(ImageData imageData, ImagePlane plane) {
        def server = imageData.getServer()
        def source = server
        if (!server.isRGB()) {
            def viewer = qupath?.getViewer()
            if (viewer == null) {
                fail('histosam: this image is not RGB; it needs the viewer to render it')
            }
            source = new RenderedImageServer.Builder(imageData)
                    .store(viewer.getImageRegionStore())
                    .renderer(viewer.getImageDisplay())
                    .build()
            logger.info('histosam: not an RGB image: sending it as the viewer shows it')
        }
        return { Map region, double downsample ->
            RegionRequest request = RegionRequest.createInstance(source.getPath(), downsample,
                    (int) region.x, (int) region.y, (int) region.width, (int) region.height, plane.getZ(), plane.getT())
            BufferedImage image = source.readRegion(request)
            BufferedImage rgb = image
            if (image.getType() != BufferedImage.TYPE_INT_RGB && image.getType() != BufferedImage.TYPE_3BYTE_BGR) {
                rgb = new BufferedImage(image.getWidth(), image.getHeight(), BufferedImage.TYPE_INT_RGB)
                Graphics2D g = rgb.createGraphics()
                g.drawImage(image, 0, 0, null)
                g.dispose()
            }
            ByteArrayOutputStream bytes = new ByteArrayOutputStream()
            ImageIO.write(rgb, 'png', bytes)
            // The image QuPath returns is round(width / downsample) wide: use its exact scale.
            return [bytes.toByteArray(), (region.width as double) / image.getWidth()]
        }
    }

    /** The slide's file path when it is a local file (sent when slide_source = path). */
    private static String slidePath(def server) {
        try {
            def uris = server.getURIs()
            URI uri = uris ? (URI) uris.iterator().next() : null
            if (uri != null && uri.getScheme() == 'file') {
                return new File(uri).getAbsolutePath()
            }
        } catch (Exception ignored) {
            // not a file-backed server
        }
        return null
    }

    // ------------------------------------------------------------------ geometry

    private ROI ringsToROI(List rings, ImagePlane plane) {
        GeometryFactory factory = GeometryTools.getDefaultFactory()
        List<Polygon> polygons = rings.collect { Map r ->
            LinearRing shell = factory.createLinearRing(coordinates(H.Geometry.closed(r.exterior)))
            LinearRing[] holes = (r.holes as List).collect { factory.createLinearRing(coordinates(H.Geometry.closed(it))) } as LinearRing[]
            factory.createPolygon(shell, holes)
        }
        Geometry geometry = polygons.size() == 1 ? polygons[0] : factory.createMultiPolygon(polygons as Polygon[])
        if (!geometry.isValid()) {
            // Pixel outlines of diagonal neighbours touch at a corner, which JTS calls invalid.
            geometry = GeometryFixer.fix(geometry)
        }
        return GeometryTools.geometryToROI(geometry, plane)
    }

    private static Coordinate[] coordinates(List ring) {
        return ring.collect { new Coordinate(it[0] as double, it[1] as double) } as Coordinate[]
    }

    private static List ringOf(LineString ring) {
        return ring.getCoordinates().collect { Coordinate c -> [c.x, c.y] }
    }

    /** An area ROI as rings (the mask prompt of a refinement). */
    private static List roiToRings(ROI roi) {
        Geometry geometry = roi.getGeometry()
        List rings = []
        for (int i = 0; i < geometry.getNumGeometries(); i++) {
            Geometry part = geometry.getGeometryN(i)
            if (part instanceof Polygon) {
                Polygon p = (Polygon) part
                rings << [exterior: ringOf(p.getExteriorRing()),
                          holes   : (0..<p.getNumInteriorRing()).collect { ringOf(p.getInteriorRingN(it)) }]
            }
        }
        return rings
    }

    private static void setIoU(PathObject pathObject, Object iou) {
        if (iou != null) {
            pathObject.getMeasurementList().put(IOU, iou as double)
        }
    }

    /** The predicted IoU, and whether click propagation spread the clicks (1) or not (0). */
    private static void setAnswerMeasurements(PathObject pathObject, Map answer) {
        setIoU(pathObject, answer.predicted_iou)
        pathObject.getMeasurementList().put(PROPAGATED, answer.propagated ? 1.0d : 0.0d)
    }

    /** Every point of every point annotation classed Positive / Negative on `plane`. */
    private static List pointsOf(PathObjectHierarchy hierarchy, ImagePlane plane) {
        List points = []
        hierarchy.getAnnotationObjects().each { PathObject o ->
            ROI roi = o.getROI()
            if (roi == null || !roi.isPoint() || o.getPathClass() == null) {
                return
            }
            if (roi.getZ() != plane.getZ() || roi.getT() != plane.getT()) {
                return
            }
            String name = o.getPathClass().getName()
            if (name != POSITIVE && name != NEGATIVE) {
                return
            }
            roi.getAllPoints().each { p -> points << [x: p.getX(), y: p.getY(), positive: name == POSITIVE] }
        }
        return points
    }

    // ------------------------------------------------------------------ live sessions

    /**
     * Listen to the hierarchy: every change re-reads the points (cheap, on QuPath's thread)
     * and one background thread asks the server (latest points win), then the result is
     * applied on the JavaFX thread.
     */
    private void startLive(Map state, Closure apply) {
        ExecutorService executor = Executors.newSingleThreadExecutor({ Runnable r ->
            Thread t = new Thread(r, 'histosam-live')
            t.setDaemon(true)
            return t
        } as ThreadFactory)
        AtomicReference<List> pending = new AtomicReference<List>()
        Closure schedule = {
            pending.set(pointsOf(state.hierarchy as PathObjectHierarchy, state.plane as ImagePlane))
            executor.submit({
                List points = pending.getAndSet(null)
                if (points == null) {
                    return
                }
                try {
                    Map answer = state.session.update(points) as Map
                    if (answer != null) {
                        if (state.session.ignoredPoints > 0) {
                            logger.warn("histosam: ${state.session.ignoredPoints} point(s) outside the region are ignored")
                        }
                        Platform.runLater({ apply.call(state, answer) } as Runnable)
                    }
                } catch (Throwable e) {
                    report(e)
                }
            } as Runnable)
        }
        PathObjectHierarchyListener listener = { PathObjectHierarchyEvent event ->
            if (!event.isChanging()) {
                schedule.call()
            }
        } as PathObjectHierarchyListener
        state.executor = executor
        state.listener = listener
        (state.hierarchy as PathObjectHierarchy).addListener(listener)
        store.put(LIVE_KEY, state)
        schedule.call()  // points already there count
        logger.info("histosam: ${state.mode} started: add Positive / Negative points; run the script again to finish")
    }

    private void stopLive() {
        Map state = store.remove(LIVE_KEY) as Map
        if (state == null) {
            return
        }
        (state.hierarchy as PathObjectHierarchy).removeListener(state.listener as PathObjectHierarchyListener)
        (state.executor as ExecutorService).shutdownNow()
        state.session.close()
        logger.info("histosam: ${state.mode} finished")
    }

    private void startInteractive() {
        ImageData imageData = currentImageData()
        PathObjectHierarchy hierarchy = imageData.getHierarchy()
        PathObject selected = hierarchy.getSelectionModel().getSelectedObject()
        def viewer = qupath.getViewer()
        Map region
        ImagePlane plane
        if (selected != null && selected.getROI() != null && selected.getROI().isArea()) {
            region = boundsOf(selected.getROI())
            plane = selected.getROI().getImagePlane()
        } else {
            region = viewerRegion(imageData)
            plane = ImagePlane.getPlane(viewer.getZPosition(), viewer.getTPosition())
        }
        def server = imageData.getServer()
        region = H.Geometry.paddedRegion(region.x as double, region.y as double, region.width as double,
                region.height as double, 0d, (double) server.getWidth(), (double) server.getHeight())
        Object client = connect()
        Object session = H.Region.open(client, region, pixelReader(imageData, plane), slidePath(server))
        PathClass pathClass = PathClass.fromString(client.settings.values.class_name as String)
        Map state = [mode: 'interactive', hierarchy: hierarchy, plane: plane, session: session,
                     pathClass: pathClass, annotation: null]
        startLive(state, { Map s, Map answer -> applyInteractive(s, answer) })
    }

    /** Create, update or remove the one result annotation of an interactive session. */
    private void applyInteractive(Map state, Map answer) {
        PathObjectHierarchy hierarchy = state.hierarchy as PathObjectHierarchy
        PathObject annotation = state.annotation as PathObject
        boolean present = annotation != null && hierarchy.getAnnotationObjects().contains(annotation)
        if (!answer.rings) {
            if (present) {
                hierarchy.removeObject(annotation, true)
            }
            state.annotation = null
            return
        }
        ROI roi = ringsToROI(answer.rings as List, state.plane as ImagePlane)
        if (!present) {  // first answer, or the user deleted the previous result
            annotation = PathObjects.createAnnotationObject(roi, state.pathClass as PathClass)
            annotation.setName('histosam')
            setAnswerMeasurements(annotation, answer)
            state.annotation = annotation
            hierarchy.addObject(annotation)
        } else {
            annotation.setROI(roi)
            setAnswerMeasurements(annotation, answer)
            hierarchy.fireHierarchyChangedEvent(this, annotation)
        }
    }

    private void startRefine() {
        ImageData imageData = currentImageData()
        PathObjectHierarchy hierarchy = imageData.getHierarchy()
        PathObject target = hierarchy.getSelectionModel().getSelectedObject()
        if (target == null || !target.isAnnotation() || target.getROI() == null || !target.getROI().isArea()) {
            fail('histosam: select the annotation to refine (an area annotation, not points) first')
        }
        ROI roi = target.getROI()
        def server = imageData.getServer()
        Object client = connect()
        Map bounds = boundsOf(roi)
        Map region = H.Geometry.paddedRegion(bounds.x as double, bounds.y as double, bounds.width as double,
                bounds.height as double, client.settings.number('margin'), (double) server.getWidth(),
                (double) server.getHeight())
        Object session = H.Region.open(client, region, pixelReader(imageData, roi.getImagePlane()), slidePath(server))
        session.maskRings = roiToRings(roi)
        Map state = [mode: 'refine', hierarchy: hierarchy, plane: roi.getImagePlane(), session: session,
                     target: target, original: roi]
        startLive(state, { Map s, Map answer -> applyRefine(s, answer) })
    }

    /** Reshape the annotation being refined (its original shape when every point is gone). */
    private void applyRefine(Map state, Map answer) {
        PathObjectHierarchy hierarchy = state.hierarchy as PathObjectHierarchy
        PathObject target = state.target as PathObject
        if (!hierarchy.getAnnotationObjects().contains(target)) {
            logger.warn('histosam: the annotation being refined was deleted; run the script again to finish')
            return
        }
        ROI roi
        if (answer.restored) {
            roi = state.original as ROI
        } else if (!answer.rings) {
            logger.warn('histosam: the refined mask is empty; the annotation is left as it was')
            return
        } else {
            roi = ringsToROI(answer.rings as List, state.plane as ImagePlane)
        }
        target.setROI(roi)
        setAnswerMeasurements(target, answer)
        hierarchy.fireHierarchyChangedEvent(this, target)
    }

    // ------------------------------------------------------------------ batch boxes

    /** Every selected rectangle annotation is a box prompt; one new annotation per box. */
    private void batchBoxes() {
        ImageData imageData = currentImageData()
        PathObjectHierarchy hierarchy = imageData.getHierarchy()
        List<PathObject> rectangles = hierarchy.getSelectionModel().getSelectedObjects().findAll { PathObject o ->
            o.isAnnotation() && o.getROI() instanceof RectangleROI
        } as List<PathObject>
        if (!rectangles) {
            fail('histosam: select one or more rectangle annotations (each one is a box prompt)')
        }
        def server = imageData.getServer()
        Object client = connect()
        PathClass pathClass = PathClass.fromString(client.settings.values.class_name as String)
        List imageSize = [(double) server.getWidth(), (double) server.getHeight()]
        List<PathObject> created = []
        int failed = 0
        rectangles.eachWithIndex { PathObject rectangle, int i ->
            ROI roi = rectangle.getROI()
            List box = [roi.getBoundsX(), roi.getBoundsY(), roi.getBoundsWidth(), roi.getBoundsHeight()]
            List results = H.Region.segmentBoxes(client, [box], imageSize, pixelReader(imageData, roi.getImagePlane()),
                    slidePath(server)) as List
            Map result = results[0] as Map
            if (result.error) {
                failed++
                logger.warn("histosam: box ${i + 1}/${rectangles.size()}: ${result.error}")
            } else if (!result.rings) {
                logger.warn("histosam: box ${i + 1}/${rectangles.size()}: empty mask")
            } else {
                PathObject annotation = PathObjects.createAnnotationObject(
                        ringsToROI(result.rings as List, roi.getImagePlane()), pathClass)
                annotation.setName('histosam box')
                setIoU(annotation, result.predicted_iou)
                created << annotation
                logger.info("histosam: box ${i + 1}/${rectangles.size()}: predicted IoU ${String.format('%.3f', result.predicted_iou as double)}")
            }
        }
        if (created) {
            hierarchy.addObjects(created)
        }
        logger.info("histosam: ${created.size()} of ${rectangles.size()} box(es) segmented" + (failed ? ", ${failed} failed" : ''))
    }
}

return { Map H, File dir, String mode -> new HistosamQuPathLayer(H, dir).run(mode) }
