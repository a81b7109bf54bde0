/*
 * histosam client for QuPath: settings, gRPC calls, and the geometry/prompt helpers.
 *
 * Pure Groovy + grpc-java + protobuf-java: no QuPath class is used here, so the same file runs
 * inside QuPath 0.5/0.6 (Groovy 4, Java 21) and under plain Groovy 2.4 in histosam's tests.
 * That is also why it is written with closures only (no Java lambdas, no `var`, no
 * try-with-resources, no do/while): those do not parse in Groovy 2.4.
 *
 * No generated stubs: the service is called through grpc-java's generic API with
 * DynamicMessage, using the descriptor set `segmentation.desc` that ships beside this file
 * (made from protos/histosam/v1/segmentation.proto). A QuPath user therefore needs only the
 * generic grpc-java jars (see README.md), never code generated for this service.
 *
 * Load it from a QuPath script with
 *
 *     def histosam = evaluate(new File(dir, 'HistosamClient.groovy'))
 *     def client = histosam.connect(dir, store)   // store: a Map kept for the whole session
 *
 * `evaluate` returns the map at the end of this file (the classes and `connect`).
 */

import com.google.protobuf.ByteString
import com.google.protobuf.DescriptorProtos
import com.google.protobuf.Descriptors
import com.google.protobuf.DynamicMessage
import com.google.protobuf.Message
import io.grpc.CallOptions
import io.grpc.Channel
import io.grpc.ClientInterceptors
import io.grpc.ManagedChannel
import io.grpc.ManagedChannelBuilder
import io.grpc.Metadata
import io.grpc.MethodDescriptor
import io.grpc.Status
import io.grpc.StatusRuntimeException
import io.grpc.stub.ClientCalls
import io.grpc.stub.MetadataUtils

import groovy.transform.CompileStatic

import java.util.concurrent.TimeUnit

/** A failure meant for a person: one clear line; `status` is the gRPC status name or CLIENT. */
class HistosamException extends RuntimeException {
    final String status

    HistosamException(String message, String status = 'CLIENT', Throwable cause = null) {
        super(message, cause)
        this.status = status
    }
}


/**
 * Where the server is and how to talk to it. Each key comes from, in this order: the Java
 * system property `histosam.KEY`, the environment variable `HISTOSAM_KEY` (upper case), the
 * settings file, the default. The settings file is `-Dhistosam.settings=FILE` /
 * `HISTOSAM_SETTINGS`, else `histosam.properties` beside the scripts, else
 * `~/.histosam/qupath.properties` (java.util.Properties format: `server = host:50051`).
 */
class HistosamSettings {
    static final String DEFAULT_TARGET = 'localhost:50051'
    static final Map<String, String> DEFAULTS = [
        server              : DEFAULT_TARGET,
        token               : '',
        token_file          : '',
        tls                 : 'false',
        timeout_seconds     : '30',
        open_timeout_seconds: '300',
        max_message_mb      : '64',
        model               : '',
        class_name          : 'Tumor',
        downsample          : '0',
        max_side            : '2048',
        margin              : '0.25',
        simplify            : '0.5',
        min_area            : '16',
        slide_source        : 'pixels',
        propagation         : 'server',
        descriptor          : '',
    ]
    /** Setting `propagation` -> ClickRequest.propagation (click propagation: see the README). */
    static final Map<String, String> PROPAGATION = [
        server: 'PROPAGATION_SERVER_DEFAULT', on: 'PROPAGATION_ON', off: 'PROPAGATION_OFF', auto: 'PROPAGATION_AUTO',
    ]

    final Map<String, String> values = [:]
    final Map<String, String> origins = [:]
    File file
    File scriptDir

    static HistosamSettings load(File scriptDir, Map sysProps = null, Map env = null) {
        Map props = sysProps == null ? System.getProperties() : sysProps
        Map environment = env == null ? System.getenv() : env
        HistosamSettings s = new HistosamSettings()
        s.scriptDir = scriptDir
        s.file = settingsFile(scriptDir, props, environment)
        Properties fromFile = new Properties()
        if (s.file != null) {
            s.file.withInputStream { stream -> fromFile.load(stream) }
            List<String> unknown = fromFile.stringPropertyNames().findAll { !DEFAULTS.containsKey(it) }.sort()
            if (unknown) {
                throw new HistosamException("histosam: unknown setting(s) ${unknown.join(', ')} in ${s.file}; " +
                        "known: ${DEFAULTS.keySet().join(', ')}")
            }
        }
        DEFAULTS.each { String key, String dflt ->
            String prop = props.get('histosam.' + key) as String
            String envValue = environment.get('HISTOSAM_' + key.toUpperCase()) as String
            if (prop != null && prop.trim()) {
                s.values[key] = prop.trim(); s.origins[key] = "system property histosam.${key}"
            } else if (envValue != null && envValue.trim()) {
                s.values[key] = envValue.trim(); s.origins[key] = "environment variable HISTOSAM_${key.toUpperCase()}"
            } else if (fromFile.getProperty(key) != null && fromFile.getProperty(key).trim()) {
                s.values[key] = fromFile.getProperty(key).trim(); s.origins[key] = "${s.file}"
            } else {
                s.values[key] = dflt; s.origins[key] = 'default'
            }
        }
        s.validate()
        return s
    }

    private static File settingsFile(File scriptDir, Map props, Map env) {
        String explicit = (props.get('histosam.settings') ?: env.get('HISTOSAM_SETTINGS')) as String
        if (explicit) {
            File f = new File(explicit)
            if (!f.isFile()) {
                throw new HistosamException("histosam: settings file ${f} (from histosam.settings / HISTOSAM_SETTINGS) does not exist")
            }
            return f
        }
        List<File> candidates = []
        if (scriptDir != null) {
            candidates << new File(scriptDir, 'histosam.properties')
        }
        String home = (props.get('user.home') ?: System.getProperty('user.home')) as String
        candidates << new File(new File(home, '.histosam'), 'qupath.properties')
        return candidates.find { it.isFile() }
    }

    private void validate() {
        ['timeout_seconds', 'open_timeout_seconds', 'max_message_mb', 'max_side'].each { String key ->
            double v = number(key)
            if (!(v > 0) || Double.isInfinite(v)) {
                throw new HistosamException("histosam: setting ${key} must be a positive number, got '${values[key]}' (${origins[key]})")
            }
        }
        ['downsample', 'margin', 'simplify', 'min_area'].each { String key ->
            double v = number(key)
            if (!(v >= 0) || Double.isInfinite(v)) {
                throw new HistosamException("histosam: setting ${key} must be a number >= 0, got '${values[key]}' (${origins[key]})")
            }
        }
        if (!PROPAGATION.containsKey(values.propagation.toLowerCase())) {
            throw new HistosamException("histosam: setting propagation must be server, on, off or auto, got '${values.propagation}' (${origins.propagation})")
        }
        if (!(values.slide_source in ['pixels', 'path'])) {
            throw new HistosamException("histosam: setting slide_source must be 'pixels' or 'path', got '${values.slide_source}'")
        }
        validateServer()
        if (!(values.tls.toLowerCase() in ['true', 'false', 'yes', 'no', '1', '0'])) {
            throw new HistosamException("histosam: setting tls must be true or false, got '${values.tls}'")
        }
    }

    /** server is HOST:PORT (a gRPC target); a URL or a missing port would fail later, less clearly. */
    private void validateServer() {
        String server = values.server.trim()
        String where = "(${origins.server})"
        if (server ==~ /(?i)(https?|grpcs?):\/\/.*/) {
            throw new HistosamException("histosam: setting server must be HOST:PORT (e.g. 127.0.0.1:50051), not a URL: '${server}' ${where}")
        }
        if (server.contains('://') || server.startsWith('unix:') || server.startsWith('dns:')) {
            return  // another gRPC target syntax (dns:///host:port, unix:path): grpc-java parses it
        }
        def m = server =~ /^(.+):(\d{1,5})$/
        if (!m.matches() || m.group(1).isEmpty()) {
            throw new HistosamException("histosam: setting server '${server}' ${where} has no port: use HOST:PORT, e.g. ${server}:50051")
        }
        String host = m.group(1)
        if (host.contains(':') && !(host.startsWith('[') && host.endsWith(']'))) {
            throw new HistosamException("histosam: setting server '${server}' ${where}: an IPv6 address needs brackets, e.g. [::1]:50051")
        }
        int port = m.group(2) as int
        if (port < 1 || port > 65535) {
            throw new HistosamException("histosam: setting server '${server}' ${where}: port ${port} is not in 1-65535")
        }
    }

    double number(String key) {
        try {
            return Double.parseDouble(values[key])
        } catch (NumberFormatException ignored) {
            throw new HistosamException("histosam: setting ${key} must be a number, got '${values[key]}' (${origins[key]})")
        }
    }

    String getTarget() { values.server }

    /** The ClickRequest.propagation enum name the `propagation` setting stands for. */
    String getPropagation() { PROPAGATION[values.propagation.toLowerCase()] }

    boolean getTls() { values.tls.toLowerCase() in ['true', 'yes', '1'] }

    long getTimeoutMillis() { (long) Math.ceil(number('timeout_seconds') * 1000) }

    long getOpenTimeoutMillis() { (long) Math.ceil(number('open_timeout_seconds') * 1000) }

    int getMaxMessageBytes() { (int) Math.min((double) Integer.MAX_VALUE, number('max_message_mb') * 1024 * 1024) }

    /** The token to send, from `token` or the first line of `token_file`; null for none. */
    String getToken() {
        if (values.token) {
            return values.token
        }
        if (values.token_file) {
            File f = new File(values.token_file)
            if (!f.isFile()) {
                throw new HistosamException("histosam: token file ${f} (${origins.token_file}) does not exist")
            }
            String text = f.getText('UTF-8').trim()
            if (!text) {
                throw new HistosamException("histosam: token file ${f} is empty")
            }
            return text
        }
        return null
    }

    File getDescriptorFile() {
        if (values.descriptor) {
            return new File(values.descriptor)
        }
        return scriptDir == null ? new File('segmentation.desc') : new File(scriptDir, 'segmentation.desc')
    }

    /** How a person changes `key`, for error messages. */
    String howToSet(String key) {
        String where = file != null ? "${key} = ... in ${file}" : "${key} = ... in histosam.properties beside the scripts"
        return "${where}, or -Dhistosam.${key}=..., or the environment variable HISTOSAM_${key.toUpperCase()}"
    }

    String describe() {
        return "server ${target} (${origins.server})" + (token != null ? ', token set' : ', no token') +
                (tls ? ', TLS' : ', plaintext')
    }
}


/** Serialises DynamicMessages of one type for grpc-java. */
class HistosamMarshaller implements MethodDescriptor.Marshaller<DynamicMessage> {
    final Descriptors.Descriptor type

    HistosamMarshaller(Descriptors.Descriptor type) {
        this.type = type
    }

    InputStream stream(DynamicMessage value) {
        return new ByteArrayInputStream(value.toByteArray())
    }

    DynamicMessage parse(InputStream stream) {
        try {
            return DynamicMessage.parseFrom(type, stream)
        } catch (IOException e) {
            throw Status.INTERNAL.withDescription("cannot parse ${type.fullName}: ${e.message}").withCause(e).asRuntimeException()
        }
    }
}


/**
 * The service contract read from a FileDescriptorSet: method descriptors for grpc-java, and
 * conversion between plain Groovy maps and DynamicMessages (field names as in the .proto).
 */
class HistosamProtocol {
    static final String SERVICE = 'histosam.v1.Segmentation'

    final String source
    final Descriptors.ServiceDescriptor service
    private final Map<String, MethodDescriptor> methods = [:]

    private HistosamProtocol(String source, Descriptors.ServiceDescriptor service) {
        this.source = source
        this.service = service
    }

    static HistosamProtocol load(File file) {
        if (!file.isFile()) {
            throw new HistosamException("histosam: the service descriptor ${file} is missing; " +
                    "run `histosam qupath install-scripts` (it puts segmentation.desc beside the scripts)")
        }
        return parse(file.bytes, file.toString())
    }

    static HistosamProtocol parse(byte[] data, String source) {
        DescriptorProtos.FileDescriptorSet set
        try {
            set = DescriptorProtos.FileDescriptorSet.parseFrom(data)
        } catch (Exception e) {
            throw new HistosamException("histosam: ${source} is not a protobuf descriptor set (${e.message})")
        }
        Map<String, DescriptorProtos.FileDescriptorProto> protos = [:]
        set.fileList.each { protos[it.name] = it }
        Map<String, Descriptors.FileDescriptor> built = [:]
        Closure build
        build = { String name, List<String> chain ->
            if (built.containsKey(name)) {
                return built[name]
            }
            DescriptorProtos.FileDescriptorProto proto = protos[name]
            if (proto == null) {
                throw new HistosamException("histosam: ${source} lacks ${name} (imported by ${chain ? chain.last() : 'nothing'})")
            }
            if (chain.contains(name)) {
                throw new HistosamException("histosam: ${source} has an import cycle through ${name}")
            }
            List<Descriptors.FileDescriptor> deps = proto.dependencyList.collect { build(it, chain + [name]) }
            Descriptors.FileDescriptor fd = Descriptors.FileDescriptor.buildFrom(proto, deps as Descriptors.FileDescriptor[])
            built[name] = fd
            return fd
        }
        protos.keySet().each { build(it, []) }
        Descriptors.ServiceDescriptor service = null
        built.values().each { fd ->
            fd.services.each { if (it.fullName == SERVICE) { service = it } }
        }
        if (service == null) {
            throw new HistosamException("histosam: ${source} does not describe the service ${SERVICE}")
        }
        return new HistosamProtocol(source, service)
    }

    Descriptors.MethodDescriptor methodInfo(String name) {
        Descriptors.MethodDescriptor md = service.findMethodByName(name)
        if (md == null) {
            throw new HistosamException("histosam: ${source} has no method ${SERVICE}/${name}; is it older than the server?")
        }
        return md
    }

    synchronized MethodDescriptor method(String name) {
        MethodDescriptor m = methods[name]
        if (m == null) {
            Descriptors.MethodDescriptor md = methodInfo(name)
            m = MethodDescriptor.newBuilder()
                    .setType(MethodDescriptor.MethodType.UNARY)
                    .setFullMethodName(MethodDescriptor.generateFullMethodName(SERVICE, name))
                    .setRequestMarshaller(new HistosamMarshaller(md.inputType))
                    .setResponseMarshaller(new HistosamMarshaller(md.outputType))
                    .build()
            methods[name] = m
        }
        return m
    }

    /** A request message of `method` from a map; unknown field names are an error. */
    DynamicMessage request(String method, Map values) {
        return build(methodInfo(method).inputType, values)
    }

    static DynamicMessage build(Descriptors.Descriptor type, Map values) {
        DynamicMessage.Builder b = DynamicMessage.newBuilder(type)
        values.each { key, value ->
            if (value == null) {
                return
            }
            Descriptors.FieldDescriptor fd = type.findFieldByName(key as String)
            if (fd == null) {
                throw new HistosamException("histosam: ${type.fullName} has no field '${key}' " +
                        "(fields: ${type.fields*.name.join(', ')}); the descriptor may be older than the script")
            }
            if (fd.isRepeated()) {
                (value as List).each { b.addRepeatedField(fd, convert(fd, it)) }
            } else {
                b.setField(fd, convert(fd, value))
            }
        }
        return b.build()
    }

    private static Object convert(Descriptors.FieldDescriptor fd, Object value) {
        switch (fd.javaType) {
            case Descriptors.FieldDescriptor.JavaType.MESSAGE:
                return value instanceof Message ? value : build(fd.messageType, value as Map)
            case Descriptors.FieldDescriptor.JavaType.DOUBLE:
                return ((Number) value).doubleValue()
            case Descriptors.FieldDescriptor.JavaType.FLOAT:
                return ((Number) value).floatValue()
            case Descriptors.FieldDescriptor.JavaType.INT:
                return ((Number) value).intValue()
            case Descriptors.FieldDescriptor.JavaType.LONG:
                return ((Number) value).longValue()
            case Descriptors.FieldDescriptor.JavaType.BOOLEAN:
                if (!(value instanceof Boolean)) {
                    throw new HistosamException("histosam: field ${fd.fullName} needs true or false, got ${value}")
                }
                return value
            case Descriptors.FieldDescriptor.JavaType.STRING:
                return value.toString()
            case Descriptors.FieldDescriptor.JavaType.BYTE_STRING:
                return value instanceof ByteString ? value : ByteString.copyFrom(value as byte[])
            case Descriptors.FieldDescriptor.JavaType.ENUM:
                Descriptors.EnumValueDescriptor ev = fd.enumType.findValueByName(value.toString())
                if (ev == null) {
                    throw new HistosamException("histosam: field ${fd.fullName} has no value ${value} " +
                            "(values: ${fd.enumType.values*.name.join(', ')})")
                }
                return ev
        }
        throw new HistosamException("histosam: unsupported field type of ${fd.fullName}")
    }

    /** Every field of `msg` by name: repeated -> List, message -> Map (null when unset), bytes -> byte[]. */
    static Map toMap(Message msg) {
        Map out = [:]
        msg.descriptorForType.fields.each { Descriptors.FieldDescriptor fd ->
            if (fd.isRepeated()) {
                List values = msg.getField(fd) as List
                // Polygons are long lists of doubles: copy scalars as they are (fast path).
                out[fd.name] = fd.javaType in [Descriptors.FieldDescriptor.JavaType.MESSAGE,
                                               Descriptors.FieldDescriptor.JavaType.BYTE_STRING,
                                               Descriptors.FieldDescriptor.JavaType.ENUM] ?
                        values.collect { plain(it) } : new ArrayList(values)
            } else if (fd.javaType == Descriptors.FieldDescriptor.JavaType.MESSAGE) {
                out[fd.name] = msg.hasField(fd) ? toMap((Message) msg.getField(fd)) : null
            } else {
                out[fd.name] = plain(msg.getField(fd))
            }
        }
        return out
    }

    private static Object plain(Object value) {
        if (value instanceof Message) {
            return toMap((Message) value)
        }
        if (value instanceof ByteString) {
            return ((ByteString) value).toByteArray()
        }
        if (value instanceof Descriptors.EnumValueDescriptor) {
            return ((Descriptors.EnumValueDescriptor) value).name
        }
        return value
    }
}


/** An opened image: its server session and the request that re-opens it. */
class HistosamImage {
    Map openRequest
    String sessionId
    int width
    int height
    Map frame
    String model
    boolean cacheHit
    double encodeSeconds
    double readSeconds  // reading/decoding the pixels server-side (a slide region: OpenSlide)
    int reopenCount = 0

    void update(Map response) {
        sessionId = response.session_id
        width = response.width as int
        height = response.height as int
        frame = response.frame
        model = response.model
        cacheHit = response.cache_hit as boolean
        encodeSeconds = response.encode_seconds as double
        readSeconds = (response.decode_image_seconds ?: 0) as double
    }
}


/**
 * One connection to a histosam server. The channel is the expensive part (a TCP/HTTP2
 * connection with its threads): `connect` with a `store` map reuses the channel kept there
 * for the whole QuPath session, so every script run after the first one starts instantly.
 * Every call carries a deadline, so a dead or stuck server gives a clear error, not a hang.
 */
class HistosamGrpc {
    static final String CHANNEL_KEY = 'histosam.channel|'

    final HistosamSettings settings
    final HistosamProtocol protocol
    final ManagedChannel channel
    final boolean ownsChannel
    private final Channel calls
    private Map info
    Closure log = { String message -> }

    HistosamGrpc(HistosamSettings settings, HistosamProtocol protocol, ManagedChannel channel, boolean ownsChannel) {
        this.settings = settings
        this.protocol = protocol
        this.channel = channel
        this.ownsChannel = ownsChannel
        String token = settings.token
        if (token != null) {
            Metadata headers = new Metadata()
            headers.put(Metadata.Key.of('authorization', Metadata.ASCII_STRING_MARSHALLER), 'Bearer ' + token)
            this.calls = ClientInterceptors.intercept(channel, MetadataUtils.newAttachHeadersInterceptor(headers))
        } else {
            this.calls = channel
        }
    }

    /** A client on the channel kept in `store` (made and kept there when missing or shut down). */
    static HistosamGrpc connect(HistosamSettings settings, HistosamProtocol protocol, Map store = null) {
        if (store == null) {
            return new HistosamGrpc(settings, protocol, openChannel(settings), true)
        }
        String key = CHANNEL_KEY + settings.target + '|' + settings.tls + '|' + settings.maxMessageBytes
        ManagedChannel channel
        synchronized (store) {
            channel = store.get(key) as ManagedChannel
            if (channel == null || channel.isShutdown()) {
                channel = openChannel(settings)
                store.put(key, channel)
            }
        }
        return new HistosamGrpc(settings, protocol, channel, false)
    }

    static ManagedChannel openChannel(HistosamSettings settings) {
        ManagedChannelBuilder builder
        try {
            builder = ManagedChannelBuilder.forTarget(settings.target)
        } catch (Exception e) {
            throw new HistosamException("histosam: cannot make a gRPC channel to '${settings.target}': ${e.message}. " +
                    'Are the grpc-java jars (grpc-netty-shaded included) in QuPath\'s extensions folder?', 'CLIENT', e)
        }
        if (settings.tls) {
            builder.useTransportSecurity()
        } else {
            builder.usePlaintext()
        }
        builder.maxInboundMessageSize(settings.maxMessageBytes)
        return builder.build()
    }

    String getTarget() { settings.target }

    /** Shut the channel down if this client made it (a channel from a store stays open). */
    void close() {
        if (ownsChannel) {
            channel.shutdownNow()
            channel.awaitTermination(5, TimeUnit.SECONDS)
        }
    }

    /** One unary call: request map in, response map out; failures become HistosamException. */
    Map call(String method, Map request, long timeoutMillis = -1) {
        long timeout = timeoutMillis > 0 ? timeoutMillis : settings.timeoutMillis
        MethodDescriptor md = protocol.method(method)
        DynamicMessage message = protocol.request(method, request)
        CallOptions options = CallOptions.DEFAULT
                .withDeadlineAfter(timeout, TimeUnit.MILLISECONDS)
                .withMaxOutboundMessageSize(settings.maxMessageBytes)
                .withMaxInboundMessageSize(settings.maxMessageBytes)
        try {
            return HistosamProtocol.toMap((Message) ClientCalls.blockingUnaryCall(calls, md, options, message))
        } catch (StatusRuntimeException e) {
            throw translate(e, method, timeout)
        }
    }

    /** A gRPC failure as one line that says what to do. */
    HistosamException translate(StatusRuntimeException e, String method, long timeoutMillis) {
        Status status = e.status
        String code = status.code.name()
        String detail = [status.description, status.cause?.message].findAll { it }.unique().join(': ') ?: 'no details'
        String message
        if (status.code == Status.Code.UNAVAILABLE) {
            message = "histosam: the server at ${target} is not reachable (${detail}). Start it with " +
                    "`histosam serve`, or point the scripts at it: ${settings.howToSet('server')}."
        } else if (status.code == Status.Code.DEADLINE_EXCEEDED) {
            message = "histosam: the server at ${target} did not answer ${method} within ${timeoutMillis / 1000} s " +
                    "(deadline exceeded); it may be overloaded, or the deadline is too short for it: " +
                    settings.howToSet(method == 'OpenImage' ? 'open_timeout_seconds' : 'timeout_seconds') + '.'
        } else if (status.code == Status.Code.UNAUTHENTICATED) {
            String which = settings.token != null ? 'the token sent was refused' : 'the server needs a token and none was sent'
            message = "histosam: UNAUTHENTICATED by the server at ${target}: ${which} (${detail}). " +
                    "Set it with ${settings.howToSet('token')} (or token_file)."
        } else if (status.code == Status.Code.PERMISSION_DENIED) {
            message = "histosam: PERMISSION_DENIED by the server at ${target}: ${detail}. " +
                    'Give the server a --slide-root holding the slide, or set slide_source = pixels.'
        } else {
            message = "histosam: ${method} failed: ${code}: ${detail}"
        }
        return new HistosamException(message, code, e)
    }

    /** GetServerInfo, asked once per client (limits, models). */
    Map serverInfo(boolean refresh = false) {
        if (info == null || refresh) {
            info = call('GetServerInfo', [:])
        }
        return info
    }

    /** Open encoded image bytes (PNG/JPEG/TIFF) whose pixel (0, 0) lies at (originX, originY). */
    HistosamImage openImage(byte[] encoded, double originX, double originY, double downsample, String model = null) {
        Map request = [model: model ?: settings.values.model, encoded_image: encoded,
                       frame: [origin_x: originX, origin_y: originY, downsample: downsample]]
        return open(request)
    }

    /** Open a level-0 rectangle of a slide the server reads itself (path as the server sees it). */
    HistosamImage openSlideRegion(String slidePath, double x, double y, double width, double height,
                                  double downsample, String model = null) {
        Map request = [model: model ?: settings.values.model,
                       slide_region: [slide_path: slidePath, x: x, y: y, width: width, height: height, downsample: downsample]]
        return open(request)
    }

    private HistosamImage open(Map request) {
        HistosamImage image = new HistosamImage(openRequest: request)
        image.update(call('OpenImage', request, settings.openTimeoutMillis))
        log("histosam: opened ${image.width}x${image.height} px (${image.cacheHit ? 'cached embedding' : String.format('read in %.2f s, encoded in %.2f s', image.readSeconds, image.encodeSeconds)}), model ${image.model}")
        return image
    }

    /**
     * All prompts so far -> the mask as polygons (client coordinates).
     *
     * points: [[x, y, positive], ...] or [[x: , y: , positive: ], ...], oldest first.
     * options: box ([x0, y0, x1, y1]), maskRings (rings as HistosamGeometry gives them: the
     * shape to refine), wantMask (add the mask PNG), simplify (image pixels), minArea (image
     * pixels), propagation ('server', 'on', 'off' or 'auto'; default: the `propagation` setting).
     * The answer is the ClickResponse as a map plus `rings` (HistosamGeometry form)
     * and `reopened`. An expired session (NOT_FOUND) is re-opened once, transparently.
     */
    Map click(HistosamImage image, List points, Map options = [:]) {
        Map request = [
            session_id        : image.sessionId,
            points            : points.collect { HistosamGeometry.point(it) },
            want_mask_png     : options.wantMask ? true : false,
            simplify_tolerance: (options.simplify != null ? options.simplify : settings.number('simplify')) as double,
            min_area          : (options.minArea != null ? options.minArea : settings.number('min_area')) as double,
        ]
        String propagation = options.propagation != null ? propagationName(options.propagation as String) : settings.propagation
        if (propagation != 'PROPAGATION_SERVER_DEFAULT') {  // unset stays readable by an older descriptor
            request.propagation = propagation
        }
        if (options.box != null) {
            List b = options.box as List
            request.box = [x0: b[0], y0: b[1], x1: b[2], y1: b[3]]
        }
        if (options.maskRings) {
            request.mask_prompt_polygons = HistosamGeometry.ringsToPolygons(options.maskRings as List)
        }
        Map reply
        boolean reopened = false
        try {
            reply = call('Click', request)
        } catch (HistosamException e) {
            if (e.status != 'NOT_FOUND' || image.openRequest == null) {
                throw e
            }
            log('histosam: the server forgot the session (expired or restarted); re-opening the region')
            image.update(call('OpenImage', image.openRequest, settings.openTimeoutMillis))
            image.reopenCount++
            reopened = true
            request.session_id = image.sessionId
            reply = call('Click', request)
        }
        reply.rings = HistosamGeometry.polygonsToRings(reply.polygons as List)
        reply.reopened = reopened
        return reply
    }

    private static String propagationName(String choice) {
        String name = HistosamSettings.PROPAGATION[choice.toLowerCase()]
        if (name == null) {
            throw new HistosamException("histosam: propagation must be server, on, off or auto, got '${choice}'")
        }
        return name
    }

    boolean closeImage(HistosamImage image) {
        return call('CloseImage', [session_id: image.sessionId]).closed as boolean
    }
}


/**
 * Geometry without QuPath: polygons as the server sends them (flat x,y lists) <-> rings as
 * lists of [x, y] pairs that the QuPath layer turns into JTS polygons / ROIs, and the
 * region arithmetic the scripts need.
 *
 * Ring form: [[exterior: [[x, y], ...], holes: [[[x, y], ...], ...]], ...], open rings
 * (first vertex not repeated), slide (client) coordinates.
 */
class HistosamGeometry {
    static Map point(Object p) {
        if (p instanceof Map) {
            return [x: (p.x as double), y: (p.y as double), positive: (p.positive as boolean)]
        }
        List values = p as List
        if (values.size() != 3) {
            throw new HistosamException("histosam: a point is [x, y, positive], got ${values}")
        }
        return [x: values[0] as double, y: values[1] as double, positive: values[2] as boolean]
    }

    @CompileStatic  // hot: a mask outline can have tens of thousands of vertices
    static List<List<Double>> pairs(List flat) {
        int n = flat.size()
        if (n % 2 != 0) {
            throw new HistosamException("histosam: a ring has an odd number of coordinates (${n})".toString())
        }
        List<List<Double>> out = new ArrayList<List<Double>>(n.intdiv(2) as int)
        for (int i = 0; i < n; i += 2) {
            List<Double> pair = new ArrayList<Double>(2)
            pair.add(((Number) flat.get(i)).doubleValue())
            pair.add(((Number) flat.get(i + 1)).doubleValue())
            out.add(pair)
        }
        return out
    }

    /** Server polygons ([exterior: flat, holes: [[xy: flat], ...]]) -> ring form. */
    static List<Map> polygonsToRings(List polygons) {
        return polygons.collect { Map p ->
            [exterior: pairs(p.exterior as List), holes: (p.holes as List).collect { Map h -> pairs(h.xy as List) }]
        }
    }

    /** A ring without its closing vertex (JTS rings repeat the first vertex at the end). */
    static List<List<Double>> open(List ring) {
        List<List<Double>> r = ring.collect { [(it[0] as double), (it[1] as double)] }
        if (r.size() > 1 && r.first() == r.last()) {
            r = r.subList(0, r.size() - 1)
        }
        return r
    }

    /** A ring with the closing vertex (what JTS LinearRing wants). */
    static List<List<Double>> closed(List ring) {
        List<List<Double>> r = open(ring)
        return r ? r + [r.first()] : r
    }

    /** Ring form -> the Polygon messages of a mask prompt (flat, open rings; < 3 vertices dropped). */
    static List<Map> ringsToPolygons(List rings) {
        List<Map> out = []
        rings.each { Map poly ->
            List ext = open(poly.exterior as List)
            if (ext.size() < 3) {
                return
            }
            List holes = (poly.holes ?: []).collect { open(it as List) }.findAll { it.size() >= 3 }
            out << [exterior: ext.flatten(), holes: holes.collect { [xy: it.flatten()] }]
        }
        return out
    }

    static double ringArea(List ring) {
        List r = open(ring)
        double twice = 0
        for (int i = 0; i < r.size(); i++) {
            List a = r[i] as List
            List b = r[(i + 1) % r.size()] as List
            twice += (a[0] as double) * (b[1] as double) - (b[0] as double) * (a[1] as double)
        }
        return Math.abs(twice) / 2
    }

    /** Area of ring-form polygons (exteriors minus holes). */
    static double area(List rings) {
        double total = 0
        rings.each { Map p ->
            total += ringArea(p.exterior as List)
            (p.holes ?: []).each { total -= ringArea(it as List) }
        }
        return total
    }

    /** [x0, y0, x1, y1] of ring-form polygons (null for none). */
    static List<Double> bounds(List rings) {
        List<List> all = rings.collect { (it.exterior as List) }.sum([]) as List
        if (!all) {
            return null
        }
        return [all*.getAt(0).min() as double, all*.getAt(1).min() as double,
                all*.getAt(0).max() as double, all*.getAt(1).max() as double]
    }

    /** A rectangle grown by `margin` x its size on every side, clipped to the image. */
    static Map paddedRegion(double x, double y, double width, double height, double margin,
                            double imageWidth, double imageHeight) {
        double x0 = Math.max(0d, Math.floor(x - margin * width))
        double y0 = Math.max(0d, Math.floor(y - margin * height))
        double x1 = Math.min(imageWidth, Math.ceil(x + width + margin * width))
        double y1 = Math.min(imageHeight, Math.ceil(y + height + margin * height))
        if (!(x1 > x0 && y1 > y0)) {
            throw new HistosamException("histosam: the region (${x}, ${y}, ${width} x ${height}) is outside the image")
        }
        return [x: x0, y: y0, width: x1 - x0, height: y1 - y0]
    }

    /**
     * The downsample to read a width x height (level-0) region at: the preferred one (0 =
     * automatic: the longest side at most maxSide pixels, never finer than level 0), made
     * coarser when needed so the image stays within the server's pixel limit.
     */
    static double chooseDownsample(double width, double height, double preferred, double maxSide, long maxPixels) {
        double ds = preferred > 0 ? preferred : Math.max(1d, Math.max(width, height) / maxSide)
        if (maxPixels > 0) {
            ds = Math.max(ds, Math.sqrt(width * height / (double) maxPixels))
            while (Math.round(width / ds) * Math.round(height / ds) > maxPixels) {
                ds *= 1.01d
            }
        }
        return ds
    }

    static boolean inside(Map region, double x, double y) {
        return x >= (region.x as double) && y >= (region.y as double) &&
                x <= (region.x as double) + (region.width as double) && y <= (region.y as double) + (region.height as double)
    }
}


/**
 * The click history of one region: points in the order they first appeared. QuPath has no
 * notion of click order, but the server keys its prompt history on it (each step is fed the
 * previous step's mask), so a point keeps its place while it exists; a deleted point drops
 * out (undo) and a moved one goes to the end.
 */
class HistosamPrompts {
    List<Map> points = []

    private static String key(Map p) {
        return "${p.x as double},${p.y as double},${p.positive as boolean}"
    }

    /** `current`: every point now present; returns true when the prompt changed. */
    boolean update(List current) {
        List<Map> now = current.collect { HistosamGeometry.point(it) }
        Set<String> present = now.collect { key(it) } as Set
        List<Map> kept = points.findAll { present.contains(key(it)) }
        Set<String> known = kept.collect { key(it) } as Set
        List<Map> next = new ArrayList<Map>(kept)
        now.each { Map p ->
            if (known.add(key(p))) {
                next << p
            }
        }
        boolean changed = next.collect { key(it) } != points.collect { key(it) }
        points = next
        return changed
    }
}


/**
 * One region being segmented by clicks (interactive) or refined from an existing shape.
 * The QuPath layer hands it the points it finds and applies what comes back; everything
 * between (which points count, when to call the server, what "no points" means) is here.
 */
class HistosamRegionSession {
    final HistosamGrpc client
    final Map region          // level-0 x, y, width, height
    final HistosamImage image
    final HistosamPrompts prompts = new HistosamPrompts()
    List maskRings            // refine: the shape being refined (ring form); null otherwise
    Map last                  // the last answer applied
    int ignoredPoints = 0     // points outside the region at the last update

    HistosamRegionSession(HistosamGrpc client, Map region, HistosamImage image) {
        this.client = client
        this.region = region
        this.image = image
    }

    /**
     * Open `region` on the server: the slide path when the server reads the file itself
     * (setting slide_source = path and a path is known), else the PNG bytes that
     * `pixels(region, downsample)` returns (QuPath: read from the image server).
     * Returns the session; `pixels` may return [bytes, effectiveDownsample] when the image
     * it read is not exactly region / downsample in size.
     */
    static HistosamRegionSession open(HistosamGrpc client, Map region, Closure pixels, String slidePath = null) {
        long maxPixels = (client.serverInfo().limits?.max_pixels ?: 0L) as long
        double ds = HistosamGeometry.chooseDownsample(region.width as double, region.height as double,
                client.settings.number('downsample'), client.settings.number('max_side'), maxPixels)
        HistosamImage image
        if (client.settings.values.slide_source == 'path' && slidePath) {
            image = client.openSlideRegion(slidePath, region.x as double, region.y as double,
                    region.width as double, region.height as double, ds)
        } else {
            Object read = pixels.call(region, ds)
            byte[] bytes
            double effective = ds
            if (read instanceof List) {
                bytes = (read as List)[0] as byte[]
                effective = (read as List)[1] as double
            } else {
                bytes = read as byte[]
            }
            image = client.openImage(bytes, region.x as double, region.y as double, effective)
        }
        return new HistosamRegionSession(client, region, image)
    }

    /**
     * The points now present (anywhere; those outside the region are ignored and counted)
     * -> the answer to apply, or null when the prompt did not change. With no points left
     * the answer has no rings (interactive: remove the result) or, when refining, the
     * original shape (`restored`: put it back).
     */
    Map update(List points) {
        List<Map> all = points.collect { HistosamGeometry.point(it) }
        List<Map> inside = all.findAll { HistosamGeometry.inside(region, it.x as double, it.y as double) }
        ignoredPoints = points.size() - inside.size()
        if (!prompts.update(inside)) {
            return null
        }
        if (prompts.points.isEmpty()) {
            last = maskRings != null ? [rings: maskRings, predicted_iou: null, restored: true]
                    : [rings: [], predicted_iou: null, cleared: true]
            return last
        }
        Map options = maskRings != null ? [maskRings: maskRings] : [:]
        last = client.click(image, prompts.points, options)
        return last
    }

    void close() {
        try {
            client.closeImage(image)
        } catch (HistosamException ignored) {
            // the server is gone or forgot the session: nothing left to free
        }
    }

    /**
     * Every box ([x, y, width, height], level 0) as a box prompt on its own region (the box
     * grown by the `margin` setting, so the object's surroundings give context). Returns,
     * per box, [box:, rings:, predicted_iou:] or [box:, error:] when that box failed (the
     * others still run). `imageSize`: [width, height] of the slide, for clipping.
     */
    static List<Map> segmentBoxes(HistosamGrpc client, List boxes, List imageSize, Closure pixels,
                                  String slidePath = null, Closure progress = null) {
        List<Map> out = []
        boxes.eachWithIndex { Object b, int i ->
            List box = b as List
            double x = box[0] as double, y = box[1] as double, w = box[2] as double, h = box[3] as double
            try {
                Map region = HistosamGeometry.paddedRegion(x, y, w, h, client.settings.number('margin'),
                        imageSize[0] as double, imageSize[1] as double)
                HistosamRegionSession session = open(client, region, pixels, slidePath)
                try {
                    Map reply = client.click(session.image, [], [box: [x, y, x + w, y + h]])
                    out << [box: box, rings: reply.rings, predicted_iou: reply.predicted_iou, region: region,
                            frame: session.image.frame]
                } finally {
                    session.close()
                }
            } catch (HistosamException e) {
                if (e.status in ['UNAVAILABLE', 'UNAUTHENTICATED', 'DEADLINE_EXCEEDED']) {
                    throw e  // every other box would fail the same way
                }
                out << [box: box, error: e.message]
            }
            if (progress != null) {
                progress.call(i + 1, boxes.size())
            }
        }
        return out
    }
}


/** Settings + descriptor + client in one call: what every QuPath script starts with. */
Closure connect = { File scriptDir, Map store = null, Map sysProps = null, Map env = null ->
    HistosamSettings settings = HistosamSettings.load(scriptDir, sysProps, env)
    HistosamProtocol protocol = HistosamProtocol.load(settings.descriptorFile)
    return HistosamGrpc.connect(settings, protocol, store)
}

return [
    connect   : connect,
    Settings  : HistosamSettings,
    Protocol  : HistosamProtocol,
    Client    : HistosamGrpc,
    Image     : HistosamImage,
    Geometry  : HistosamGeometry,
    Prompts   : HistosamPrompts,
    Region    : HistosamRegionSession,
    Exception : HistosamException,
]
