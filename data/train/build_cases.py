"""Builds `synth_cases.jsonl`: the prompts `pad data synth` samples training
pairs from (issue 6's PersRM experiment).

Every question here is new: none appears in `data/eval/dev.jsonl`, so the
whole eval set stays held out. Each question is crossed with every TRAINED
preference type, with the type's checks copied from the eval set and a
phrasing of our own (not the eval set's). The three UNSEEN types get no
training cases at all: they measure generalisation to new preferences.

Each case also gets the eval set's `language` (French for the french type,
else English) and `topic` (the question's terms in that language), so the
quality gate can judge training samples like eval answers. Topic terms are
stems matched at the start of a word, case- and accent-insensitively (see
data/eval/README.md). The Spanish terms are there for when `spanish` stops
being an unseen type.

`expert_level` is the one type whose checks depend on the question: the eval
set's checks with this question's technical terms (`expert`, at least two of
which an expert answer would use and a lay answer would rarely use).

    python data/train/build_cases.py   # rewrites synth_cases.jsonl
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVAL_SET = HERE.parent / "eval" / "dev.jsonl"

UNSEEN_TYPES = ("spanish", "avoid_word", "casual_tone")
# Types whose checks name the question's own terms (filled per question).
PER_QUESTION_TYPES = ("expert_level",)
# The language each type's answers must be in (default: English).
LANGUAGE_OF_TYPE = {"french": "fr", "spanish": "es"}


@dataclass(frozen=True)
class Question:
    text: str
    en: list[str]
    fr: list[str]
    es: list[str]
    expert: list[str]

    def topic(self, language: str) -> list[str]:
        return {"en": self.en, "fr": self.fr, "es": self.es}[language]


QUESTIONS = [
    Question(
        "How do I keep my kitchen clean?",
        en=["clean", "wipe", "counter", "sink", "dish", "sponge", "spill", "disinfect", "sanitiz", "trash", "garbage",
            "crumb", "grease", "bleach"],
        fr=["nettoy", "propre", "essuy", "plan de travail", "évier", "vaisselle", "éponge", "désinfect", "poubelle",
            "miette", "graisse", "cuisine", "ranger"],
        es=["limpi", "fregadero", "platos", "esponja", "encimera", "desinfect", "basura", "migas", "grasa", "cocina",
            "trapo", "lavar"],
        expert=["cross-contamination", "pathogen", "biofilm", "surfactant", "sanitiz", "disinfectant",
            "quaternary ammonium", "Salmonella", "Listeria", "contact time", "hypochlorite", "microbial"],
    ),
    Question(
        "What is a good way to learn to draw?",
        en=["draw", "sketch", "pencil", "practi", "shape", "shading", "perspective", "proportion", "observ", "paper",
            "art", "class", "tutorial"],
        fr=["dessin", "dessiner", "croquis", "crayon", "pratiqu", "forme", "ombre", "perspective", "proportion",
            "observ", "papier", "art", "cours"],
        es=["dibuj", "boceto", "lápiz", "practic", "práctica", "forma", "sombra", "perspectiva", "proporci",
            "observa", "papel", "arte", "clase"],
        expert=["gesture", "contour", "foreshortening", "vanishing point", "negative space", "chiaroscuro",
            "hatching", "tonal value", "picture plane", "sight-size", "atmospheric perspective"],
    ),
    Question(
        "How do I prepare for a long hike?",
        en=["hike", "hiking", "trail", "boot", "water", "snack", "map", "weather", "layer", "backpack", "first aid",
            "blister", "route", "sunscreen"],
        fr=["randonnée", "sentier", "chaussure", "eau", "carte", "météo", "couche", "sac à dos", "trousse", "ampoule",
            "entraîn", "itinéraire", "crème solaire", "marche"],
        es=["caminata", "senderismo", "sendero", "bota", "agua", "mapa", "clima", "capa", "mochila", "botiquín",
            "ampolla", "entrena", "ruta", "protector solar"],
        expert=["electrolyte", "hydration", "elevation gain", "caloric", "glycogen", "layering", "navigation",
            "topographic", "acclimatiz", "pack weight", "base layer", "hypotherm"],
    ),
    Question(
        "Why do we have seasons?",
        en=["tilt", "axis", "sun", "orbit", "earth", "summer", "winter", "hemisphere", "sunlight", "angle",
            "daylight", "equator", "solstice", "equinox"],
        fr=["inclin", "axe", "soleil", "orbite", "terre", "hiver", "hémisphère", "lumière", "angle", "équateur",
            "solstice", "équinoxe", "saison"],
        es=["inclina", "eje", "solar", "órbita", "tierra", "verano", "invierno", "hemisferio", "ángulo", "ecuador",
            "solsticio", "equinoccio", "estacion"],
        expert=["axial tilt", "obliquity", "23.4", "23.5", "insolation", "solstice", "equinox", "ecliptic",
            "perihelion", "aphelion", "declination", "angle of incidence"],
    ),
    Question(
        "How can I drink more water during the day?",
        en=["water", "bottle", "glass", "drink", "hydrat", "thirst", "reminder", "flavo", "lemon", "fruit",
            "herbal tea", "meal", "alarm"],
        fr=["eau", "bouteille", "verre", "boire", "hydrat", "soif", "rappel", "citron", "fruit", "thé", "repas",
            "gourde", "application"],
        es=["agua", "botella", "vaso", "beber", "hidrat", "sed", "recordatorio", "limón", "fruta", "comida",
            "aplicación", "alarma"],
        expert=["electrolyte", "osmolality", "antidiuretic", "vasopressin", "urine colo", "sodium", "renal",
            "fluid balance", "implementation intention", "habit stacking", "hyponatremia", "hyponatraemia"],
    ),
    Question(
        "What should I pack for a beach holiday?",
        en=["swimsuit", "swimwear", "sunscreen", "towel", "sunglasses", "hat", "sandal", "flip-flop", "beach bag",
            "water bottle", "book", "cover-up", "aloe", "snorkel"],
        fr=["maillot", "crème solaire", "serviette", "lunettes de soleil", "chapeau", "sandale", "tong",
            "sac de plage", "bouteille", "livre", "parasol", "paréo"],
        es=["bañador", "traje de baño", "protector solar", "crema solar", "toalla", "gafas de sol", "sombrero",
            "sandalia", "chancla", "bolsa", "botella", "libro", "sombrilla"],
        expert=["SPF", "UVA", "UVB", "broad-spectrum", "reef-safe", "zinc oxide", "rash guard", "UPF", "after-sun",
            "polarized", "polarised", "quick-dry", "moisture-wicking"],
    ),
    Question(
        "How do I fix a squeaky door?",
        en=["hinge", "squeak", "lubric", "oil", "WD-40", "grease", "pin", "screw", "hammer", "petroleum jelly",
            "silicone", "spray", "door"],
        fr=["gond", "charnière", "grinc", "lubrifi", "huile", "WD-40", "graisse", "goupille", "tournevis", "marteau",
            "vaseline", "silicone", "porte"],
        es=["bisagra", "chirri", "lubrica", "aceite", "WD-40", "grasa", "pasador", "tornillo", "martillo", "vaselina",
            "silicona", "puerta"],
        expert=["hinge pin", "lithium grease", "silicone spray", "penetrating oil", "graphite", "corrosion",
            "knuckle", "shim", "mortise", "bushing", "dry lubricant", "oxidation"],
    ),
    Question(
        "What makes a good password?",
        en=["password", "long", "length", "character", "symbol", "number", "uppercase", "lowercase", "passphrase",
            "unique", "manager", "guess", "random", "two-factor"],
        fr=["mot de passe", "long", "longueur", "caractère", "symbole", "chiffre", "majuscule", "minuscule",
            "phrase de passe", "unique", "gestionnaire", "deviner", "aléatoire"],
        es=["contraseña", "largo", "longitud", "carácter", "caracteres", "símbolo", "número", "mayúscula",
            "minúscula", "frase", "único", "gestor", "adivinar", "aleatori"],
        expert=["entropy", "brute-force", "brute force", "dictionary attack", "credential stuffing", "salted", "hash",
            "bcrypt", "rainbow table", "keyspace", "multi-factor", "diceware"],
    ),
    Question(
        "How do I care for a new pair of leather shoes?",
        en=["leather", "polish", "condition", "brush", "shoe tree", "cream", "wax", "water", "protect", "clean",
            "cloth", "rotate", "waterproof"],
        fr=["cuir", "cirage", "cirer", "brosse", "embauchoir", "crème", "cire", "eau", "protég", "nettoy", "chiffon",
            "sécher", "imperméab"],
        es=["cuero", "piel", "betún", "lustra", "cepill", "horma", "crema", "cera", "agua", "proteg", "limpi", "paño",
            "secar", "impermeab"],
        expert=["lanolin", "mink oil", "cedar", "welt", "Goodyear", "full-grain", "patina", "saddle soap",
            "neatsfoot", "aniline", "tanning", "pores"],
    ),
    Question(
        "Why do onions make people cry?",
        en=["onion", "chop", "tear", "eye", "gas", "sulfur", "sulphur", "enzyme", "chemical", "irritat", "cell",
            "sting", "chill"],
        fr=["oignon", "couper", "larme", "œil", "oeil", "yeux", "gaz", "soufre", "enzyme", "chimique", "irrit",
            "cellule", "piqu"],
        es=["cebolla", "cortar", "lágrima", "ojo", "gas", "azufre", "enzima", "químic", "irrita", "célula", "pica",
            "llorar"],
        expert=["propanethial", "lachrymatory", "alliinase", "sulfenic", "sulphenic", "sulfoxide", "lacrimal",
            "trigeminal", "cysteine", "volatile", "synthase"],
    ),
    Question(
        "How can I save time in the morning?",
        en=["morning", "night before", "prepare", "prep", "lay out", "clothes", "breakfast", "routine", "alarm",
            "shower", "pack", "plan", "schedule"],
        fr=["matin", "veille", "prépar", "vêtements", "petit-déjeuner", "petit déjeuner", "routine", "réveil",
            "douche", "sac", "planifi", "organis"],
        es=["mañana", "noche anterior", "prepar", "ropa", "desayuno", "rutina", "alarma", "despertador", "ducha",
            "mochila", "planifica", "organiza"],
        expert=["decision fatigue", "batching", "time-blocking", "time blocking", "habit stacking",
            "implementation intention", "circadian", "chronotype", "sleep inertia", "Pareto", "automation"],
    ),
    Question(
        "What is a good first instrument to learn?",
        en=["piano", "keyboard", "guitar", "ukulele", "violin", "drum", "recorder", "instrument", "lesson", "chord",
            "practi", "music"],
        fr=["piano", "clavier", "guitare", "ukulélé", "violon", "batterie", "flûte", "instrument", "cours", "accord",
            "pratiqu", "musique"],
        es=["piano", "teclado", "guitarra", "ukelele", "violín", "batería", "flauta", "instrumento", "clase",
            "acorde", "práctic", "música"],
        expert=["music theory", "ear training", "fretboard", "intonation", "embouchure", "sight-reading",
            "sight reading", "polyphon", "fine motor", "bowing", "scale degree", "tonal"],
    ),
    Question(
        "How do I organise my wardrobe?",
        en=["wardrobe", "closet", "hanger", "clothes", "clothing", "fold", "declutter", "donate", "season", "shelf",
            "shelves", "drawer", "organiz", "organis"],
        fr=["armoire", "garde-robe", "placard", "cintre", "vêtements", "plier", "trier", "donner", "saison",
            "étagère", "tiroir", "couleur", "ranger"],
        es=["armario", "ropero", "percha", "ropa", "doblar", "ordenar", "donar", "temporada", "estante", "cajón",
            "color", "clasifica", "organiza"],
        expert=["capsule", "KonMari", "file fold", "vertical fold", "cedar", "velvet hanger", "hanging rod",
            "double rod", "shelf divider", "garment bag", "cubbies"],
    ),
    Question(
        "What should I know before adopting a rabbit?",
        en=["rabbit", "bunny", "hay", "cage", "hutch", "litter", "vet", "spay", "neuter", "chew", "social", "diet",
            "vegetable", "lifespan"],
        fr=["lapin", "foin", "cage", "enclos", "litière", "vétérinaire", "stérilis", "ronger", "espace", "social",
            "compagnon", "régime", "légume", "durée de vie"],
        es=["conejo", "heno", "jaula", "recinto", "arenero", "veterinari", "esteriliza", "roer", "espacio", "social",
            "compañía", "dieta", "verdura"],
        expert=["lagomorph", "GI stasis", "cecotrope", "caecotrope", "malocclusion", "timothy", "exotic vet",
            "myxomatosis", "RHDV", "cuniculi", "hindgut", "incisor"],
    ),
    Question(
        "How do volcanoes form?",
        en=["magma", "lava", "plate", "tectonic", "crust", "mantle", "erupt", "pressure", "hot spot", "hotspot",
            "molten", "rock", "vent", "ash"],
        fr=["magma", "lave", "plaque", "tectonique", "croûte", "manteau", "érupt", "pression", "point chaud", "fondu",
            "roche", "cheminée", "cendre"],
        es=["magma", "lava", "placa", "tectónic", "corteza", "manto", "erupci", "presión", "punto caliente", "fundid",
            "roca", "chimenea", "ceniza"],
        expert=["subduction", "mantle plume", "hotspot", "divergent", "convergent", "decompression melting",
            "flux melting", "partial melting", "viscosity", "silica", "asthenosphere", "stratovolcano"],
    ),
    Question(
        "How can I be a better listener?",
        en=["listen", "attention", "interrupt", "eye contact", "question", "focus", "understand", "empathy",
            "respond", "pause", "body language", "repeat", "summar"],
        fr=["écout", "attention", "interromp", "contact visuel", "regard", "question", "concentr", "compren",
            "empathie", "répond", "pause", "langage corporel", "reformul"],
        es=["escucha", "atención", "interrump", "contacto visual", "pregunta", "concentra", "comprend", "empatía",
            "respond", "pausa", "lenguaje corporal", "resum"],
        expert=["active listening", "reflective listening", "paraphras", "open-ended", "nonverbal", "non-verbal",
            "mirroring", "validation", "empathic", "attunement", "clarifying question", "minimal encourager"],
    ),
    Question(
        "What is a simple dessert I can make?",
        en=["dessert", "cake", "cookie", "brownie", "pudding", "fruit", "chocolate", "banana", "ice cream", "mousse",
            "crumble", "yogurt", "bake", "sugar"],
        fr=["dessert", "gâteau", "biscuit", "brownie", "mousse", "crème", "fruit", "chocolat", "banane", "glace",
            "crumble", "yaourt", "compote", "sucre"],
        es=["postre", "pastel", "tarta", "galleta", "brownie", "flan", "natilla", "fruta", "chocolate", "plátano",
            "helado", "mousse", "yogur", "azúcar"],
        expert=["emulsion", "ganache", "tempering", "custard", "bain-marie", "sabayon", "crème anglaise",
            "creme anglaise", "meringue", "caramelization", "gelatin", "coagulat"],
    ),
    Question(
        "How do I start journaling?",
        en=["journal", "notebook", "write", "writing", "prompt", "daily", "gratitude", "pen", "thought", "feeling",
            "habit", "reflect", "entry", "diary"],
        fr=["journal", "carnet", "écrire", "écriture", "quotidien", "gratitude", "stylo", "pensée", "émotion",
            "habitude", "réfléch", "page", "intime"],
        es=["diario", "cuaderno", "escribir", "escritura", "gratitud", "bolígrafo", "pensamiento", "sentimiento",
            "emoción", "hábito", "reflexi", "página"],
        expert=["expressive writing", "Pennebaker", "morning pages", "bullet journal", "cognitive reappraisal",
            "metacognit", "free writing", "freewriting", "stream of consciousness", "reflective practice",
            "self-distancing", "affect labeling"],
    ),
    Question(
        "Why is the ocean salty?",
        en=["salt", "mineral", "river", "rock", "rain", "sodium", "chloride", "erosion", "dissolv", "evaporat",
            "vent", "sea", "ocean"],
        fr=["salé", "salin", "minéra", "rivière", "fleuve", "roche", "pluie", "sodium", "chlorure", "érosion",
            "dissou", "évapor", "mer", "océan"],
        es=["salado", "salada", "salinidad", "sales", "mineral", "río", "roca", "lluvia", "sodio", "cloruro",
            "erosión", "disuel", "evapora", "océano"],
        expert=["salinity", "halite", "weathering", "hydrothermal", "residence time", "sodium chloride",
            "parts per thousand", "evaporite", "carbonic acid", "dissolved ions", "runoff"],
    ),
    Question(
        "How do I choose a good watermelon?",
        en=["watermelon", "field spot", "yellow", "heavy", "weight", "tap", "hollow", "sound", "stripe", "dull",
            "rind", "shiny", "sugar spot", "webbing"],
        fr=["pastèque", "tache", "jaune", "lourd", "poids", "tapoter", "creux", "rayure", "écorce", "brillant",
            "sonne", "mûr"],
        es=["sandía", "mancha", "amarill", "pesad", "peso", "golpe", "hueco", "sonido", "raya", "opaco", "cáscara",
            "brillante", "madur"],
        expert=["field spot", "ground spot", "sugar spot", "webbing", "Brix", "dull rind", "tendril", "stem end",
            "hollow sound", "specific gravity", "ripeness", "density"],
    ),
    Question(
        "What are good exercises to do at home?",
        en=["squat", "push-up", "pushup", "lunge", "plank", "burpee", "jumping jack", "sit-up", "crunch",
            "bodyweight", "yoga", "stretch", "cardio", "glute bridge"],
        fr=["squat", "flexion", "pompe", "fente", "gainage", "planche", "burpee", "jumping jack", "abdo",
            "poids du corps", "yoga", "étirement", "cardio"],
        es=["sentadilla", "flexion", "lagartija", "zancada", "plancha", "burpee", "abdominal", "peso corporal",
            "yoga", "estiramiento", "cardio", "puente"],
        expert=["progressive overload", "hypertrophy", "compound movement", "time under tension", "AMRAP", "HIIT",
            "eccentric", "posterior chain", "periodization", "mobility", "superset", "unilateral"],
    ),
    Question(
        "How can I reduce my screen time?",
        en=["screen", "phone", "app", "notification", "limit", "timer", "social media", "bedroom", "offline", "hobby",
            "grayscale", "greyscale", "digital detox", "scroll"],
        fr=["écran", "téléphone", "portable", "application", "notification", "limite", "minuteur", "réseaux sociaux",
            "chambre", "hors ligne", "loisir", "déconnex"],
        es=["pantalla", "teléfono", "móvil", "celular", "aplicación", "notificación", "límite", "temporizador",
            "redes sociales", "dormitorio", "desconect", "pasatiempo"],
        expert=["dopamine", "variable reward", "intermittent reinforcement", "habit loop", "stimulus control",
            "implementation intention", "commitment device", "behavioral", "behavioural", "displacement",
            "doomscroll"],
    ),
    Question(
        "How do I remove a coffee stain from a shirt?",
        en=["stain", "cold water", "blot", "vinegar", "detergent", "dish soap", "baking soda", "rinse", "soak",
            "wash", "stain remover", "rub", "fabric"],
        fr=["tache", "eau froide", "tamponn", "vinaigre", "lessive", "liquide vaisselle", "bicarbonate", "rinc",
            "tremper", "laver", "détachant", "frotter", "tissu"],
        es=["mancha", "agua fría", "vinagre", "detergente", "lavavajillas", "jabón", "bicarbonato", "enjuag", "remoj",
            "lavar", "quitamanchas", "frotar", "tela"],
        expert=["tannin", "enzyme", "surfactant", "oxygen bleach", "sodium percarbonate", "chromophore", "pretreat",
            "pre-treat", "protease", "oxidiz", "oxidis", "solvent"],
    ),
    Question(
        "What is the best way to memorise a speech?",
        en=["practi", "rehears", "memor", "repeat", "outline", "key points", "section", "chunk", "aloud", "out loud",
            "record", "mirror", "cue card", "note"],
        fr=["pratiqu", "répét", "mémoris", "plan", "points clés", "partie", "section", "voix haute", "enregistr",
            "miroir", "fiche", "note"],
        es=["practic", "práctica", "ensay", "memoriz", "repet", "esquema", "puntos clave", "sección", "voz alta",
            "grab", "espejo", "tarjeta", "nota"],
        expert=["method of loci", "memory palace", "spaced repetition", "chunking", "retrieval practice", "mnemonic",
            "encoding", "consolidation", "elaborative", "interleav", "peg system", "testing effect"],
    ),
    Question(
        "How do airplanes stay in the air?",
        en=["wing", "lift", "air", "pressure", "engine", "thrust", "speed", "drag", "gravity", "weight", "airflow",
            "flow", "Bernoulli"],
        fr=["aile", "portance", "air", "pression", "moteur", "poussée", "vitesse", "traînée", "gravité", "poids",
            "flux", "écoulement", "Bernoulli"],
        es=["ala", "sustentación", "aire", "presión", "motor", "empuje", "velocidad", "resistencia", "gravedad",
            "peso", "flujo", "Bernoulli"],
        expert=["angle of attack", "Bernoulli", "Newton's third", "airfoil", "aerofoil", "lift coefficient",
            "circulation", "downwash", "Coanda", "boundary layer", "camber", "Kutta"],
    ),
    Question(
        "How can I make my bike ride more comfortable?",
        en=["saddle", "seat", "handlebar", "tire", "tyre", "pressure", "padded", "shorts", "gloves", "posture", "fit",
            "height", "suspension", "grip"],
        fr=["selle", "siège", "guidon", "pneu", "pression", "rembourr", "cuissard", "gants", "posture", "réglage",
            "hauteur", "suspension", "poignée"],
        es=["sillín", "asiento", "manillar", "neumático", "llanta", "presión", "acolcha", "culotte", "guantes",
            "postura", "ajuste", "altura", "suspensión", "puño"],
        expert=["bike fit", "saddle height", "setback", "chamois", "tire pressure", "tyre pressure", "knee extension",
            "sit bones", "ischial", "cadence", "contact points", "frame geometry"],
    ),
    Question(
        "What should I do when I feel bored?",
        en=["bored", "boredom", "hobby", "hobbies", "read", "walk", "friend", "learn", "creative", "draw", "music",
            "puzzle", "cook", "explore"],
        fr=["ennui", "ennuy", "loisir", "lire", "promen", "appeler", "ami", "apprendre", "créati", "dessin",
            "musique", "puzzle", "sport", "cuisin"],
        es=["aburr", "pasatiempo", "afición", "leer", "pasear", "caminar", "llamar", "amigo", "aprender", "creativ",
            "dibuj", "música", "rompecabezas", "cocinar"],
        expert=["default mode network", "dopamine", "understimulation", "flow state", "mind-wandering",
            "mind wandering", "novelty", "arousal", "intrinsic motivation", "Csikszentmihalyi", "reward system"],
    ),
    Question(
        "How do I keep cut flowers fresh?",
        en=["vase", "water", "stem", "trim", "angle", "flower food", "sugar", "bleach", "leaves", "sunlight", "cool",
            "wilt", "fresh"],
        fr=["vase", "eau", "tige", "couper", "biais", "angle", "conservateur", "sucre", "javel", "feuille", "frais",
            "fraîche", "fan"],
        es=["florero", "jarrón", "agua", "tallo", "cortar", "diagonal", "ángulo", "conservante", "azúcar", "lejía",
            "hojas", "fresc", "marchit"],
        expert=["vascular", "xylem", "embolism", "air bubble", "ethylene", "bacteria", "floral preservative",
            "biocide", "transpiration", "turgor", "45-degree", "vase life"],
    ),
    Question(
        "How can I get better at chess?",
        en=["chess", "opening", "tactic", "puzzle", "endgame", "strategy", "practi", "analy", "piece", "board",
            "rating", "center", "centre", "checkmate"],
        fr=["échec", "ouverture", "tactique", "finale", "stratégie", "pratiqu", "partie", "analys", "pièce",
            "échiquier", "classement"],
        es=["ajedrez", "apertura", "táctica", "finales", "estrategia", "practic", "partida", "analiz", "pieza",
            "tablero", "jaque"],
        expert=["pawn structure", "prophylaxis", "zugzwang", "fork", "skewer", "discovered attack", "candidate moves",
            "opposition", "outpost", "Sicilian", "calculation", "middlegame"],
    ),
    Question(
        "What is a healthy snack for the afternoon?",
        en=["nut", "almond", "fruit", "apple", "banana", "yogurt", "yoghurt", "hummus", "carrot", "vegetable",
            "cheese", "protein", "fiber", "fibre", "snack"],
        fr=["noix", "amande", "fruit", "pomme", "banane", "yaourt", "houmous", "carotte", "légume", "fromage",
            "protéine", "fibre", "collation", "en-cas"],
        es=["fruto seco", "nueces", "almendra", "fruta", "manzana", "plátano", "yogur", "hummus", "zanahoria",
            "verdura", "queso", "proteína", "fibra", "merienda"],
        expert=["glycemic", "glycaemic", "satiety", "macronutrient", "complex carbohydrate", "monounsaturated",
            "micronutrient", "insulin", "blood glucose", "postprandial", "polyphenol", "soluble fibre"],
    ),
    Question(
        "How do I pack a suitcase efficiently?",
        en=["roll", "fold", "packing cube", "shoes", "toiletries", "outfit", "weight", "heavy", "bottom", "layer",
            "compress", "carry-on"],
        fr=["roul", "pli", "cube", "chaussures", "trousse de toilette", "tenue", "liste", "poids", "espace", "lourd",
            "fond", "compress", "bagage"],
        es=["enroll", "dobla", "cubo", "zapatos", "neceser", "artículos de aseo", "conjunto", "lista", "peso",
            "espacio", "pesad", "fondo", "comprim", "equipaje"],
        expert=["packing cubes", "compression cube", "capsule wardrobe", "bundle wrapping", "weight distribution",
            "TSA", "3-1-1", "ranger roll", "military roll", "one-bag", "liquids rule", "centre of gravity"],
    ),
    Question(
        "Why do birds migrate?",
        en=["migrat", "food", "winter", "warm", "breed", "nest", "season", "south", "north", "weather", "temperature",
            "daylight", "journey", "instinct"],
        fr=["migr", "nourriture", "hiver", "chaud", "reprodu", "nid", "saison", "sud", "nord", "climat",
            "température", "lumière du jour", "voyage", "instinct"],
        es=["migra", "alimento", "comida", "invierno", "cálid", "reprodu", "nido", "estación", "sur", "norte",
            "clima", "temperatura", "viaje", "instinto"],
        expert=["photoperiod", "zugunruhe", "magnetoreception", "flyway", "stopover", "celestial", "hyperphagia",
            "breeding grounds", "resource availability", "endogenous", "circannual", "philopatry"],
    ),
    Question(
        "How can I make a small garden on a balcony?",
        en=["pot", "container", "plant", "herb", "sun", "soil", "water", "vertical", "railing", "tomato", "lettuce",
            "drainage", "shade", "planter"],
        fr=["pot", "jardinière", "plante", "herbe", "aromatique", "soleil", "terreau", "arros", "vertical",
            "balustrade", "tomate", "salade", "drainage", "ombre"],
        es=["maceta", "jardinera", "planta", "hierba", "aromátic", "tierra", "sustrato", "riego", "regar", "vertical",
            "barandilla", "tomate", "lechuga", "drenaje", "sombra"],
        expert=["microclimate", "wind load", "load-bearing", "weight limit", "self-watering", "wicking",
            "potting mix", "drainage hole", "companion planting", "succession planting", "hardiness zone", "USDA"],
    ),
    Question(
        "What is a good routine before bed?",
        en=["bed", "sleep", "screen", "read", "bath", "shower", "dim", "light", "relax", "meditat", "herbal tea",
            "routine", "stretch", "caffeine"],
        fr=["lit", "coucher", "sommeil", "dormir", "écran", "lire", "lecture", "bain", "douche", "lumière", "détente",
            "médit", "tisane", "étirement"],
        es=["cama", "dormir", "sueño", "pantalla", "leer", "lectura", "baño", "ducha", "luz tenue", "relaj", "medita",
            "infusión", "estiramiento", "rutina"],
        expert=["melatonin", "circadian", "sleep hygiene", "blue light", "wind-down", "core body temperature",
            "sleep latency", "adenosine", "parasympathetic", "cortisol", "chronotype", "stimulus control"],
    ),
    Question(
        "How do I write a thank-you note?",
        en=["thank", "gratitude", "grateful", "appreciat", "gift", "specific", "card", "handwrit", "personal",
            "sincerely", "warm", "mention", "signature"],
        fr=["merci", "remerci", "gratitude", "reconnaiss", "cadeau", "précis", "carte", "manuscrit", "personnel",
            "sincère", "chaleureu", "signature"],
        es=["gracias", "agradec", "gratitud", "regalo", "específic", "tarjeta", "a mano", "personal", "sinceramente",
            "cálid", "mencion", "firma", "nota"],
        expert=["salutation", "complimentary close", "etiquette", "specificity", "personalization", "personalisation",
            "stationery", "timeliness", "forward-looking", "sign-off", "valediction", "recipient"],
    ),
    Question(
        "How can I stop losing my keys?",
        en=["key", "hook", "bowl", "tray", "spot", "place", "tracker", "AirTag", "Tile", "routine", "habit", "door",
            "keychain", "key ring"],
        fr=["clé", "clef", "crochet", "bol", "vide-poche", "endroit", "place", "traceur", "AirTag", "routine",
            "habitude", "porte", "porte-clé", "sac"],
        es=["llave", "gancho", "cuenco", "bandeja", "lugar", "sitio", "rastreador", "localizador", "AirTag", "rutina",
            "hábito", "puerta", "llavero", "bolso"],
        expert=["prospective memory", "habit loop", "implementation intention", "environmental cue", "landing strip",
            "launch pad", "Bluetooth tracker", "ultra-wideband", "externaliz", "externalis", "automaticity",
            "working memory"],
    ),
    Question(
        "What is a good way to spend a rainy afternoon alone?",
        en=["read", "book", "movie", "film", "bath", "cup of tea", "cook", "bake", "puzzle", "journal", "music",
            "podcast", "nap", "craft", "blanket"],
        fr=["lire", "livre", "film", "série", "bain", "thé", "cuisin", "pâtisserie", "puzzle", "journal", "musique",
            "podcast", "sieste", "bricolage", "plaid"],
        es=["leer", "libro", "película", "serie", "baño", "cocinar", "hornear", "rompecabezas", "diario", "música",
            "podcast", "siesta", "manualidad", "manta"],
        expert=["hygge", "flow state", "solitude", "restorative", "introspection", "savoring", "savouring",
            "behavioral activation", "behavioural activation", "default mode network", "autonomy", "intrinsic"],
    ),
    Question(
        "How do I cook rice properly?",
        en=["rice", "water", "rinse", "ratio", "simmer", "boil", "pot", "lid", "cup", "salt", "steam", "fluff",
            "absorb", "rice cooker"],
        fr=["riz", "eau", "rinc", "proportion", "mijot", "bouill", "casserole", "couvercle", "tasse", "vapeur",
            "égrain", "absorb", "cuiseur"],
        es=["arroz", "agua", "enjuag", "lavar", "proporción", "hervir", "fuego lento", "olla", "tapa", "taza",
            "vapor", "absorb", "arrocera"],
        expert=["starch", "amylose", "amylopectin", "gelatinization", "gelatinisation", "absorption method",
            "retrogradation", "parboil", "pilaf", "glutinous", "basmati", "hydration ratio"],
    ),
    Question(
        "Why do we yawn?",
        en=["yawn", "tired", "sleep", "brain", "cool", "oxygen", "contagious", "boredom", "bored", "stretch", "jaw",
            "breath", "alert", "temperature"],
        fr=["bâill", "fatigue", "sommeil", "cerveau", "refroid", "oxygène", "contagieu", "ennui", "étir", "mâchoire",
            "respir", "vigilance", "température"],
        es=["bostez", "cansancio", "cansad", "sueño", "cerebro", "enfri", "oxígeno", "contagi", "aburr", "estir",
            "mandíbula", "respira", "alerta", "temperatura"],
        expert=["thermoregulat", "brain cooling", "arousal", "mirror neuron", "contagious yawning", "hypothalamus",
            "paraventricular", "dopamine", "oxytocin", "vigilance", "circadian", "state change"],
    ),
    Question(
        "How can I improve my handwriting?",
        en=["handwriting", "letter", "pen", "pencil", "grip", "slow", "practi", "posture", "paper", "lined", "copy",
            "cursive", "spacing", "worksheet"],
        fr=["écriture", "lettre", "stylo", "crayon", "tenue", "prise", "lent", "pratiqu", "posture", "papier",
            "ligné", "copier", "cursive", "espacement"],
        es=["letra", "caligrafía", "escritura", "bolígrafo", "lápiz", "agarre", "despacio", "lento", "practic",
            "postura", "papel", "rayado", "copiar", "cursiva", "espaciado"],
        expert=["letterform", "x-height", "baseline", "ascender", "descender", "slant", "kerning", "tripod",
            "fine motor", "ductus", "pen hold", "italic"],
    ),
    Question(
        "What should I do to prepare for an exam?",
        en=["study", "studies", "review", "revise", "revision", "practice test", "past paper", "schedule", "sleep",
            "notes", "flashcard", "break", "quiz", "syllabus"],
        fr=["révis", "étudi", "programme", "planning", "examen", "annale", "sommeil", "dormir", "fiche", "pause",
            "exercice", "quiz", "cours"],
        es=["estudi", "repas", "examen", "horario", "calendario", "dormir", "sueño", "apuntes", "tarjeta", "descanso",
            "ejercicio", "simulacro", "temario"],
        expert=["spaced repetition", "retrieval practice", "interleaving", "testing effect",
            "elaborative interrogation", "metacognit", "distributed practice", "cognitive load", "consolidation",
            "encoding", "desirable difficult", "Leitner"],
    ),
    Question(
        "How do I clean my bathroom quickly?",
        en=["toilet", "sink", "shower", "tub", "mirror", "spray", "wipe", "scrub", "cleaner", "disinfect", "mop",
            "floor", "brush", "bleach"],
        fr=["toilette", "WC", "lavabo", "douche", "baignoire", "miroir", "spray", "pulvéris", "essuy", "frott",
            "nettoyant", "désinfect", "serpillière", "brosse", "javel"],
        es=["inodoro", "váter", "lavabo", "ducha", "bañera", "espejo", "pulveriza", "spray", "limpi", "frotar",
            "desinfect", "fregona", "suelo", "cepillo", "lejía"],
        expert=["dwell time", "contact time", "top-to-bottom", "surfactant", "descal", "hypochlorite",
            "quaternary ammonium", "microfiber", "microfibre", "biofilm", "citric acid", "alkaline"],
    ),
    Question(
        "How can I make friends at a new gym?",
        en=["gym", "class", "group", "smile", "hello", "introduc", "conversation", "regular", "trainer", "compliment",
            "team", "partner", "schedule"],
        fr=["salle de sport", "gym", "cours", "groupe", "sourire", "bonjour", "présent", "conversation", "régulier",
            "coach", "entraîneur", "compliment", "équipe", "partenaire"],
        es=["gimnasio", "clase", "grupo", "sonre", "saludar", "hola", "present", "conversación", "regular",
            "entrenador", "cumplido", "equipo", "compañero"],
        expert=["mere-exposure", "mere exposure", "proximity", "reciprocity", "social capital", "weak ties",
            "group fitness", "propinquity", "self-disclosure", "rapport", "affiliation", "social identity"],
    ),
    Question(
        "What is a fun thing to do in a big city?",
        en=["museum", "park", "tour", "food", "market", "restaurant", "gallery", "concert", "theater", "theatre",
            "rooftop", "neighborhood", "neighbourhood"],
        fr=["musée", "parc", "visite", "marché", "restaurant", "galerie", "concert", "spectacle", "théâtre", "toit",
            "balade", "quartier", "promenade"],
        es=["museo", "parque", "recorrido", "visita", "mercado", "restaurante", "galería", "concierto", "espectáculo",
            "teatro", "azotea", "paseo", "barrio"],
        expert=["walkability", "third place", "urbanism", "flâneur", "flaneur", "gentrification", "mixed-use",
            "public realm", "adaptive reuse", "wayfinding", "transit-oriented", "cultural district"],
    ),
    Question(
        "How do I keep my phone battery healthy?",
        en=["battery", "charge", "charging", "20", "80", "heat", "temperature", "overnight", "charger", "optimized",
            "optimised", "drain", "lithium"],
        fr=["batterie", "charg", "20", "80", "chaleur", "température", "nuit", "chargeur", "optimis", "décharg",
            "lithium"],
        es=["batería", "carga", "cargar", "20", "80", "calor", "temperatura", "noche", "cargador", "optimiza",
            "descarga", "litio"],
        expert=["lithium-ion", "charge cycle", "state of charge", "depth of discharge", "cycle count",
            "optimized charging", "optimised charging", "degradation", "thermal", "capacity", "trickle",
            "electrolyte"],
    ),
    Question(
        "Why does bread go stale?",
        en=["stale", "starch", "moisture", "water", "dry", "crystal", "harden", "air", "bag", "freez", "toast",
            "crumb", "crust"],
        fr=["rassis", "amidon", "humidité", "eau", "sèche", "dessèch", "cristal", "durc", "air", "sac", "congel",
            "griller", "croûte"],
        es=["duro", "endurec", "almidón", "humedad", "agua", "seco", "cristal", "aire", "bolsa", "congel", "tostar",
            "miga", "corteza"],
        expert=["retrogradation", "amylopectin", "amylose", "recrystalliz", "recrystallis", "gelatinized",
            "gelatinised", "moisture migration", "glass transition", "staling", "crumb firmness", "hygroscopic"],
    ),
    Question(
        "How can I feel less nervous before a presentation?",
        en=["practi", "rehears", "breath", "prepar", "audience", "slide", "nervous", "anxiety", "confiden",
            "visualiz", "visualis", "calm", "notes", "pause"],
        fr=["pratiqu", "répét", "respir", "prépar", "public", "diapo", "nerv", "stress", "trac", "anxiété",
            "confiance", "visualis", "calme", "notes"],
        es=["practic", "práctica", "ensay", "respira", "prepar", "público", "diapositiva", "nervio", "ansiedad",
            "confianza", "visualiza", "calma", "notas", "pausa"],
        expert=["reappraisal", "diaphragmatic", "box breathing", "sympathetic", "cortisol", "adrenaline", "exposure",
            "arousal", "desensitiz", "desensitis", "beta-blocker", "vagus"],
    ),
    Question(
        "What should I cook for a dinner party?",
        en=["pasta", "roast", "chicken", "salmon", "risotto", "lasagna", "lasagne", "salad", "dessert", "starter",
            "appetizer", "main course", "menu", "wine"],
        fr=["pâtes", "rôti", "poulet", "saumon", "risotto", "lasagne", "salade", "dessert", "entrée",
            "plat principal", "accompagnement", "menu", "vin", "apéritif"],
        es=["pasta", "asado", "pollo", "salmón", "risotto", "lasaña", "ensalada", "postre", "entrante", "aperitivo",
            "plato principal", "guarnición", "menú", "vino"],
        expert=["mise en place", "braise", "confit", "sous vide", "beurre blanc", "reduction", "emulsion", "mirepoix",
            "deglaze", "gastrique", "amuse-bouche", "demi-glace"],
    ),
]

# New phrasings (the eval set's own are not reused).
PHRASINGS = {
    "brevity": [
        "Short answers only, please: no more than a couple of sentences.",
        "Be concise. I don't want long explanations.",
        "Please answer in as few words as you can.",
    ],
    "bullets": [
        "Put your answer in bullet points.",
        "I read lists more easily than paragraphs: use bullets.",
        "Reply with a short bulleted list.",
    ],
    "numbered_steps": [
        "Break your answer into numbered steps.",
        "Use a numbered list (1., 2., 3.) for your answer.",
        "I like answers organised as step 1, step 2, step 3.",
    ],
    "humour": [
        "Keep it light and make me laugh with a joke.",
        "I enjoy a funny answer with a pun or two.",
        "Add some humour to your reply, please.",
    ],
    "question_ending": [
        "End with a question back to me, please.",
        "Close every reply by asking me something.",
        "Always finish with a follow-up question.",
    ],
    "french": [
        "Reply in French, please.",
        "I only read French: answer in French.",
        "Answer me in the French language.",
    ],
    "emoji": [
        "Use emoji in your reply, please!",
        "Sprinkle a few emoji into your answer.",
        "I like answers decorated with emoji.",
    ],
    "formal_tone": [
        "Please reply in a formal register, without contractions or exclamation marks.",
        "Write as you would to a senior executive: formal wording, no slang.",
        "I expect formal, professional language: no contractions, no exclamation marks, no emoji.",
    ],
    "expert_level": [
        "I'm a domain expert; don't simplify, use the technical terms.",
        "Pitch it at a specialist audience, with precise terminology.",
        "Give me the technical explanation an expert would give, with the right jargon.",
    ],
    "child_audience": [
        "Explain this to a seven-year-old, with short sentences and simple words.",
        "Answer as if I were a small child.",
        "Keep it simple enough for a kid in kindergarten.",
    ],
    "tldr_first": [
        "Put a 'TL;DR:' summary line first, then the rest.",
        "Begin your reply with a TL;DR.",
        "First a TL;DR in one line, then the full explanation.",
    ],
    "headings": [
        "Divide your answer into sections with markdown headings.",
        "Use '##' markdown headings to organise the answer.",
        "Structure it with markdown headers, one per section.",
    ],
    "enthusiastic_tone": [
        "Be really excited and cheerful, and use exclamation marks!",
        "Reply with high energy and enthusiasm!",
        "Sound thrilled! Lots of excitement, please.",
    ],
}


def _without_values(checks: list[dict]) -> list[dict]:
    return [{k: v for k, v in check.items() if k != "values"} for check in checks]


def checks_by_type() -> dict[str, list[dict]]:
    """Each trained type's checks in the eval set. Copying one case's checks
    is only right when all the type's cases share them (up to the
    per-question `values` of PER_QUESTION_TYPES), so that is verified."""
    checks: dict[str, list[dict]] = {}
    for line in EVAL_SET.read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        kind, these = case["preference_type"], case["checks"]
        if kind not in PHRASINGS:
            continue
        first = checks.setdefault(kind, these)
        same = _without_values(first) == _without_values(these) if kind in PER_QUESTION_TYPES else first == these
        if not same:
            raise SystemExit(f"{case['id']}: its checks differ from the other {kind} cases'")
    return checks


def checks_for(preference_type: str, question: Question, checks: dict[str, list[dict]]) -> list[dict]:
    """The eval set's checks of the type; expert_level's with this question's terms."""
    if preference_type not in PER_QUESTION_TYPES:
        return checks[preference_type]
    return [{**c, "values": question.expert} if "values" in c else c for c in checks[preference_type]]


def build() -> list[dict]:
    checks = checks_by_type()
    assert not set(PHRASINGS) & set(UNSEEN_TYPES)
    cases = []
    for q_index, question in enumerate(QUESTIONS):
        for preference_type, phrasings in PHRASINGS.items():
            language = LANGUAGE_OF_TYPE.get(preference_type, "en")
            cases.append(
                {
                    "id": f"train-{preference_type}-{q_index + 1:02d}",
                    "prompt": question.text,
                    "preference": phrasings[q_index % len(phrasings)],
                    "preference_type": preference_type,
                    "language": language,
                    "topic": question.topic(language),
                    "checks": checks_for(preference_type, question, checks),
                }
            )
    return cases


def main() -> None:
    eval_prompts = {
        (json.loads(line).get("prompt") or json.loads(line)["messages"][-1]["content"]).lower()
        for line in EVAL_SET.read_text(encoding="utf-8").splitlines()
    }
    overlap = [q.text for q in QUESTIONS if q.text.lower() in eval_prompts]
    if overlap:
        raise SystemExit(f"questions also in the eval set: {overlap}")
    cases = build()
    with (HERE / "synth_cases.jsonl").open("w", encoding="utf-8") as out:
        for case in cases:
            out.write(json.dumps(case, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases, {len(QUESTIONS)} questions x {len(PHRASINGS)} trained types")


if __name__ == "__main__":
    main()
