/*
 * histosam: a headless check of the QuPath side, outside QuPath (run by `histosam qupath ping`):
 *
 *     groovy -cp GRPC_JAVA_JARS histosam_ping.groovy SCRIPTS_DIR [histosam.KEY=VALUE ...]
 *
 * Loads HistosamClient.groovy from SCRIPTS_DIR exactly as the QuPath scripts do, with the
 * settings they would read there (histosam.properties beside it, HISTOSAM_* variables,
 * -Dhistosam.* properties; the KEY=VALUE arguments win), asks the server for its info and
 * prints one line, exit 0; or the client's one-line message on stderr, exit 1.
 */

if (args.length < 1) {
    System.err.println('usage: histosam_ping.groovy SCRIPTS_DIR [histosam.KEY=VALUE ...]')
    System.exit(2)
}
File dir = new File(args[0])
def histosam = evaluate(new File(dir, 'HistosamClient.groovy'))
Map sys = new HashMap(System.getProperties())
args.toList().drop(1).each { String arg ->
    int eq = arg.indexOf('=')
    if (eq > 0) {
        sys[arg.substring(0, eq)] = arg.substring(eq + 1)
    }
}
def client = null
int status = 0
try {
    client = histosam.connect(dir, null, sys, System.getenv())
    Map info = client.serverInfo()
    println "histosam server ${info.version} at ${client.target} answers the QuPath client: models " +
            "${info.models*.name.join(', ')}"
} catch (Exception e) {
    if (e.getClass().simpleName != 'HistosamException') {
        throw e
    }
    System.err.println(e.message)
    status = 1
} finally {
    client?.close()
}
System.exit(status)
