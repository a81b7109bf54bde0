/*
 * Test driver for qupath-scripts/HistosamClient.groovy, run by tests/test_groovy_client.py as
 *
 *     groovy -cp <grpc-java jars> histosam_client_checks.groovy SPEC.json
 *     groovy -cp <grpc-java jars> histosam_client_checks.groovy --ping SCRIPTS_DIR SERVER [TOKEN]
 *
 * SPEC.json: {"scripts_dir": ..., "out_dir": ..., "checks": [{"name": ..., "kind": ..., ...}]}.
 * Every check runs in this one JVM (start-up is the slow part) and records what it saw in
 * OUT_DIR/results.json, {name: {ok: true, ...} or {ok: false, status:, error:, seconds:}};
 * the Python test asserts on those and replays the same requests with the Python client.
 * The client is loaded exactly as the QuPath scripts load it: evaluate(HistosamClient.groovy).
 *
 * --ping: the smallest end-to-end use, for the exit code: server info on stdout and exit 0,
 * or the client's one-line message on stderr and exit 1.
 */

import groovy.json.JsonOutput
import groovy.json.JsonSlurper
import org.codehaus.groovy.control.CompilationUnit
import org.codehaus.groovy.control.Phases

import javax.imageio.ImageIO
import java.awt.RenderingHints
import java.awt.image.BufferedImage

if (args.length >= 3 && args[0] == '--ping') {
    File dir = new File(args[1])
    def histosam = evaluate(new File(dir, 'HistosamClient.groovy'))
    Map sys = ['histosam.server': args[2], 'histosam.timeout_seconds': '5']
    if (args.length >= 4) {
        sys['histosam.token'] = args[3]
    }
    def client = null
    try {
        client = histosam.connect(dir, null, sys, [:])
        Map info = client.serverInfo()
        println "histosam server ${info.version} at ${args[2]}: models ${info.models*.name.join(', ')}"
    } catch (Exception e) {
        if (e.getClass().simpleName != 'HistosamException') {
            throw e
        }
        System.err.println(e.message)
        System.exit(1)
    } finally {
        client?.close()
    }
    System.exit(0)
}

Map spec = new JsonSlurper().parse(new File(args[0])) as Map
File scriptsDir = new File(spec.scripts_dir as String)
File outDir = new File(spec.out_dir as String)
outDir.mkdirs()
def histosam = evaluate(new File(scriptsDir, 'HistosamClient.groovy'))
Map store = [:]   // stands in for QuPath's session-wide store (one channel per server)

/** The client of a check: explicit settings only, so the caller's environment never leaks in. */
Closure clientFor = { Map check ->
    Map sys = ['histosam.server': check.server, 'histosam.descriptor': spec.descriptor]
    (check.settings ?: [:]).each { k, v -> sys['histosam.' + k] = v as String }
    if (check.token) {
        sys['histosam.token'] = check.token
    }
    return histosam.connect(scriptsDir, check.shared ? store : null, sys, [:])
}

/** Rings as JSON-friendly lists (they already are; doubles stay doubles). */
Closure ringsJson = { List rings -> rings.collect { [exterior: it.exterior, holes: it.holes] } }

/** A stand-in for QuPath's image server: crops and scales a PNG "slide", keeps what was sent. */
Closure slideReader = { File slideFile, String tag ->
    BufferedImage slide = ImageIO.read(slideFile)
    List sent = []
    Closure reader = { Map region, double ds ->
        int x = region.x as int, y = region.y as int, w = region.width as int, h = region.height as int
        int outW = Math.max(1, Math.round(w / ds) as int), outH = Math.max(1, Math.round(h / ds) as int)
        BufferedImage out = new BufferedImage(outW, outH, BufferedImage.TYPE_INT_RGB)
        def g = out.createGraphics()
        g.setRenderingHint(RenderingHints.KEY_INTERPOLATION, RenderingHints.VALUE_INTERPOLATION_BILINEAR)
        g.drawImage(slide.getSubimage(x, y, w, h), 0, 0, outW, outH, null)
        g.dispose()
        ByteArrayOutputStream bytes = new ByteArrayOutputStream()
        ImageIO.write(out, 'png', bytes)
        File f = new File(outDir, "${tag}_sent_${sent.size()}.png")
        f.bytes = bytes.toByteArray()
        double effective = w / (double) outW
        sent << [file: f.path, origin_x: x as double, origin_y: y as double, downsample: effective]
        return [bytes.toByteArray(), effective]
    }
    return [reader: reader, sent: sent, width: slide.width, height: slide.height]
}

Map checks = [
    parse_scripts: { Map check ->
        // Syntax of every script under this Groovy (2.4 in the tests): QuPath classes are not
        // resolved (that needs QuPath), but Groovy-4-only syntax would fail here.
        Map out = [:]
        (check.files as List).each { String path ->
            CompilationUnit unit = new CompilationUnit()
            unit.addSource(new File(path))
            try {
                unit.compile(Phases.CONVERSION)
                out[new File(path).name] = 'ok'
            } catch (Exception e) {
                out[new File(path).name] = e.message
            }
        }
        return [files: out]
    },

    settings: { Map check ->
        def s = histosam.Settings.load(check.script_dir ? new File(check.script_dir as String) : null,
                check.sys ?: [:], check.env ?: [:])
        return [values: s.values, origins: s.origins, target: s.target, token: s.token, tls: s.tls,
                timeout_ms: s.timeoutMillis, max_message_bytes: s.maxMessageBytes, describe: s.describe(),
                descriptor: s.descriptorFile.path, propagation: s.propagation]
    },

    encode: { Map check ->
        def protocol = histosam.Protocol.load(new File(spec.descriptor as String))
        def message = protocol.request(check.method as String, check.request as Map)
        File f = new File(outDir, "${check.name}.bin")
        f.bytes = message.toByteArray()
        return [file: f.path, back: histosam.Protocol.toMap(message)]
    },

    session: { Map check ->
        def client = clientFor(check)
        try {
            List frame = check.frame as List
            def image = client.openImage(new File(check.image as String).bytes, frame[0] as double, frame[1] as double,
                    frame[2] as double)
            List steps = []
            (check.steps as List).eachWithIndex { Map step, int i ->
                Map options = [simplify: step.simplify ?: 0, minArea: step.min_area ?: 0, wantMask: step.want_mask ?: false]
                if (step.box) {
                    options.box = step.box
                }
                if (step.mask_rings) {
                    options.maskRings = step.mask_rings
                }
                if (step.propagation) {
                    options.propagation = step.propagation
                }
                if (step.close_first) {
                    client.closeImage(image)
                }
                Map reply = client.click(image, step.points as List, options)
                String maskFile = null
                if (reply.mask_png) {
                    File f = new File(outDir, "${check.name}_mask_${i}.png")
                    f.bytes = reply.mask_png as byte[]
                    maskFile = f.path
                }
                steps << [rings: ringsJson(reply.rings), predicted_iou: reply.predicted_iou, mask: maskFile,
                          num_points: reply.num_points, decoded_steps: reply.decoded_steps, reopened: reply.reopened,
                          mask_pixels: reply.mask_pixels, area: histosam.Geometry.area(reply.rings),
                          propagated: reply.propagated ?: false]
            }
            boolean closed = client.closeImage(image)
            return [session_id: image.sessionId, width: image.width, height: image.height, frame: image.frame,
                    reopen_count: image.reopenCount, steps: steps, closed: closed]
        } finally {
            client.close()
        }
    },

    region_session: { Map check ->
        def client = clientFor(check)
        Map slide = slideReader(new File(check.slide as String), check.name as String)
        try {
            Map region = check.region as Map
            def session = histosam.Region.open(client, region, slide.reader)
            if (check.mask_rings) {
                session.maskRings = check.mask_rings
            }
            List updates = (check.updates as List).collect { List points ->
                Map answer = session.update(points)
                answer == null ? [changed: false, ignored: session.ignoredPoints] :
                        [changed: true, ignored: session.ignoredPoints, rings: ringsJson(answer.rings as List),
                         predicted_iou: answer.predicted_iou, cleared: answer.cleared ?: false,
                         restored: answer.restored ?: false, prompt: session.prompts.points]
            }
            session.close()
            return [sent: slide.sent, frame: session.image.frame, updates: updates]
        } finally {
            client.close()
        }
    },

    boxes: { Map check ->
        def client = clientFor(check)
        Map slide = slideReader(new File(check.slide as String), check.name as String)
        List progress = []
        try {
            List results = histosam.Region.segmentBoxes(client, check.boxes as List, [slide.width, slide.height],
                    slide.reader, null, { int done, int total -> progress << [done, total] })
            return [results: results.collect { Map r ->
                r.error ? [box: r.box, error: r.error] :
                        [box: r.box, rings: ringsJson(r.rings as List), predicted_iou: r.predicted_iou, region: r.region,
                         frame: r.frame]
            }, sent: slide.sent, progress: progress]
        } finally {
            client.close()
        }
    },

    channel_reuse: { Map check ->
        def a = clientFor(check + [shared: true])
        def b = clientFor(check + [shared: true])
        def c = clientFor(check + [shared: false])
        Map info = b.serverInfo()
        boolean cOpen = !c.channel.isShutdown()
        c.close()
        b.close()  // a shared channel outlives its clients
        return [same: a.channel.is(b.channel), separate: !c.channel.is(a.channel), store_size: store.size(),
                shared_open_after_close: !a.channel.isShutdown(), own_closed_after_close: c.channel.isShutdown(),
                own_was_open: cOpen, version: info.version]
    },

    error: { Map check ->
        def client = clientFor(check)
        long t0 = System.nanoTime()
        try {
            client.call(check.method as String ?: 'GetServerInfo', (check.request ?: [:]) as Map)
            return [raised: false]
        } catch (Exception e) {
            if (e.getClass().simpleName != 'HistosamException') {
                throw e
            }
            return [raised: true, status: e.status, message: e.message, seconds: (System.nanoTime() - t0) / 1e9]
        } finally {
            client.close()
        }
    },

    geometry: { Map check ->
        def G = histosam.Geometry
        Map out = [:]
        out.downsample = (check.downsample as List).collect { List a ->
            G.chooseDownsample(a[0] as double, a[1] as double, a[2] as double, a[3] as double, a[4] as long)
        }
        out.padded = (check.padded as List).collect { List a ->
            try {
                G.paddedRegion(a[0] as double, a[1] as double, a[2] as double, a[3] as double, a[4] as double,
                        a[5] as double, a[6] as double)
            } catch (Exception e) {
                [error: e.message]
            }
        }
        out.closed = G.closed(check.ring as List)
        out.opened = G.open(G.closed(check.ring as List))
        out.area = G.area(check.rings as List)
        out.bounds = G.bounds(check.rings as List)
        out.polygons = G.ringsToPolygons(check.rings as List)
        out.round_trip = G.polygonsToRings(G.ringsToPolygons(check.rings as List))
        def prompts = histosam.Prompts.newInstance()
        out.prompts = (check.prompt_steps as List).collect { List points ->
            boolean changed = prompts.update(points)
            [changed: changed, points: prompts.points.collect { [it.x, it.y, it.positive] }]
        }
        return out
    },
]

Map results = [:]
(spec.checks as List).each { Map check ->
    long t0 = System.nanoTime()
    try {
        Map result = checks[check.kind as String].call(check) as Map
        results[check.name] = [ok: true] + result + [seconds: (System.nanoTime() - t0) / 1e9]
    } catch (Throwable e) {
        StringWriter trace = new StringWriter()
        e.printStackTrace(new PrintWriter(trace))
        results[check.name] = [ok: false, status: e.hasProperty('status') ? e.status : null, error: e.toString(),
                               trace: trace.toString().readLines().take(25).join('\n'),
                               seconds: (System.nanoTime() - t0) / 1e9]
    }
}
store.values().each { it.shutdownNow() }
new File(outDir, 'results.json').text = JsonOutput.toJson(results)
println "histosam groovy checks: ${results.count { k, v -> v.ok }} ok, ${results.count { k, v -> !v.ok }} failed"
