/*
 * histosam: refine an existing annotation by clicks.
 *
 * Select the annotation to refine and run this script: its shape becomes the mask prompt of
 * the server, and Positive / Negative points (inside the annotation's bounding box grown by
 * the `margin` setting) reshape it. Removing every point puts the original shape back. Run
 * the script again to finish (the annotation keeps its refined shape).
 *
 * Needs: a running histosam server (`histosam serve`), the grpc-java jars in QuPath's
 * extensions folder, and this folder installed by `histosam qupath install-scripts`
 * (see README.md beside this file).
 */

// Where HistosamClient.groovy and segmentation.desc are; `histosam qupath install-scripts`
// writes the folder here. Otherwise: -Dhistosam.scripts=DIR, HISTOSAM_SCRIPTS, or
// ~/.histosam/qupath-scripts.
def histosamDir = null  // HISTOSAM_SCRIPTS_DIR

def dir = [histosamDir, System.getProperty('histosam.scripts'), System.getenv('HISTOSAM_SCRIPTS'),
           new File(new File(System.getProperty('user.home'), '.histosam'), 'qupath-scripts').path]
        .findAll { it }
        .collect { new File(it as String) }
        .find { new File(it, 'HistosamClient.groovy').isFile() }
if (dir == null) {
    throw new FileNotFoundException('histosam: HistosamClient.groovy not found; run `histosam qupath install-scripts` ' +
            'or set -Dhistosam.scripts=DIR to the folder holding it')
}
def histosam = evaluate(new File(dir, 'HistosamClient.groovy'))
def qupathLayer = evaluate(new File(dir, 'HistosamQuPath.groovy'))
qupathLayer.call(histosam, dir, 'refine')
